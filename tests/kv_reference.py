"""Reference decoding with plain transformers: full prefill, then attend only to kept tokens.

This is the oracle for the engine's eviction: the prompt is prefilled with full attention (the
engine's first token also comes from full attention, since each layer is compacted after its own
attention), then each layer's KV cache is cut, per KV head, to the kept indices, and greedy
decoding continues with LOGICAL positions for RoPE (``position_ids``) and physical cache
positions.

The kept indices come from the reference's OWN selection (``select``): it captures each layer's
post-RoPE queries, keys and values from its own full prefill (not from the engine) and runs the
request's policy on them, so a wrong window row, a stale stash or a wrong key read in the engine
makes the engine's kept tokens (and its output) differ from the reference's. Benchmarks import it
from here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

#: layer -> ``[num_kv_heads][kept]`` kept token indices.
KeptIndices = dict[int, list[list[int]]]


@dataclass(frozen=True)
class LayerInputs:
    """One layer's tensors from the reference's full prefill (batch 1).

    Attributes:
        queries: ``[num_q_heads, L, head_dim]`` after RoPE.
        keys: ``[num_kv_heads, L, head_dim]`` after RoPE.
        values: ``[num_kv_heads, L, head_dim]``.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor


class ReferenceModel:
    """A Hugging Face causal LM in fp32 on CPU.

    Args:
        model_dir: folder with config, weights and tokenizer.
    """

    def __init__(self, model_dir: Path | str) -> None:
        #: layer -> merged values of the last ``select`` (``merge: on``), else empty.
        self.merged: dict[int, torch.Tensor] = {}
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
        self.model.eval()
        self.num_layers = self.model.config.num_hidden_layers

    @contextlib.contextmanager
    def _capture(self) -> Iterator[dict[int, LayerInputs]]:
        """Records every layer's post-RoPE q/k/v while the block runs (sdpa swapped back after)."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import AttentionInterface

        captured: dict[int, LayerInputs] = {}

        def capture(module, query, key, value, *args, **kwargs):
            captured[module.layer_idx] = LayerInputs(query[0].detach().clone(),
                                                     key[0].detach().clone(),
                                                     value[0].detach().clone())
            return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

        AttentionInterface.register("sdpa", capture)
        try:
            yield captured
        finally:
            AttentionInterface.register("sdpa", sdpa_attention_forward)

    @torch.no_grad()
    def layer_inputs(self, prompt_ids: list[int]) -> dict[int, LayerInputs]:
        """Each layer's post-RoPE queries, keys and values of a full prefill."""
        with self._capture() as captured:
            self.model(torch.tensor([prompt_ids]), use_cache=False)
        return captured

    @torch.no_grad()
    def select(self, prompt_ids: list[int], spec: object) -> KeptIndices | None:
        """The reference's own selection for a request: what the engine must keep.

        The same contract as the engine: ``kept = spec.kept_tokens(L)`` per layer budget, every
        layer filled to the largest layer budget (one block table per request), layers reusing
        their ``selection_layer``'s choice; scores from this model's own q/k/v.

        Returns:
            layer -> ``[num_kv_heads][kept]``, or ``None`` when the request is not compressed.
            For a policy with ``merge: on``, ``self.merged`` then holds layer -> ``[H, kept,
            D]`` merged values (pass them to ``greedy``).
        """
        from vllm_kvcompress.policies import (
            LayerObservation,
            build_policy,
            load_model_data,
            model_data_hook,
        )
        from vllm_kvcompress.policies.rotary import Rotary

        seq_len = len(prompt_ids)
        kept = spec.kept_tokens(seq_len)
        if kept is None:
            return None
        policy = build_policy(spec)
        protected = min(spec.sink_tokens + spec.window, seq_len)
        kept = max(policy.layer_budget(kept, layer, self.num_layers, seq_len, protected)
                   for layer in range(self.num_layers))
        if kept >= seq_len:
            return None
        inputs = self.layer_inputs(prompt_ids)
        hook = model_data_hook(spec)
        model_data = load_model_data(hook, getattr(spec, hook.param)) if hook else None
        # The engine's table covers max_position_embeddings positions (vLLM's cos_sin_cache).
        rotary = Rotary.from_hf(self.model, self.model.config.max_position_embeddings)
        def observe(layer: int) -> LayerObservation:
            tensors = inputs[layer]
            return LayerObservation(
                seq_len=seq_len, budget=kept, sink_tokens=spec.sink_tokens,
                window=spec.window, layer_idx=layer, num_layers=self.num_layers,
                num_kv_heads=tensors.keys.shape[0],
                queries=tensors.queries[:, -spec.window:], keys=tensors.keys,
                values=tensors.values, model_data=model_data, rotary=rotary)

        chosen: dict[int, torch.Tensor] = {}
        result: KeptIndices = {}
        self.merged = {}
        for layer in range(self.num_layers):
            source = policy.selection_layer(layer)
            if source not in chosen:
                chosen[source] = policy.keep_indices(observe(source))
            result[layer] = chosen[source].tolist()
            if hasattr(policy, "merged_values"):
                # Each layer merges its own evicted tokens into the (possibly reused) kept set.
                self.merged[layer] = policy.merged_values(observe(layer), chosen[source])
        return result

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], max_tokens: int,
               kept: KeptIndices | None = None,
               merged: dict[int, torch.Tensor] | None = None) -> list[int]:
        """Greedy continuation of ``prompt_ids``.

        Args:
            prompt_ids: the prompt's token ids (length ``L``).
            max_tokens: tokens to generate.
            kept: layer -> per KV head sorted kept prompt indices (``[H][kept]``, or one
                ``[kept]`` list shared by every head); ``None`` keeps everything.
            merged: layer -> ``[H, kept, D]`` values for the kept slots (``merge: on``).

        Returns:
            ``max_tokens`` generated token ids.
        """
        out = self.model(torch.tensor([prompt_ids]), use_cache=True)
        cache = out.past_key_values
        token = int(out.logits[0, -1].argmax())
        if kept is not None:
            _cut(cache, kept, merged)
        return [token, *self._decode(cache, token, len(prompt_ids), max_tokens - 1)]

    @torch.no_grad()
    def greedy_on_compressed_prefix(self, context_ids: list[int], kept: KeptIndices,
                                    suffix_ids: list[int], max_tokens: int,
                                    merged: dict[int, torch.Tensor] | None = None
                                    ) -> list[int]:
        """Greedy continuation of ``context_ids + suffix_ids`` where the context was compressed
        BEFORE the suffix existed (compress once, reuse): the context is prefilled with full
        attention, each layer's cache is cut to ``kept``, then the suffix is prefilled attending
        to the kept keys and to itself, at logical positions ``len(context) ..`` (RoPE) and the
        next physical cache slots, and is never cut.

        Args:
            context_ids: the context's token ids (length ``L``).
            kept: layer -> per KV head kept context indices (this reference's own selection on
                the context alone, ``select(context_ids, spec)``).
            suffix_ids: the tokens after the context (the question), at least one.
            max_tokens: tokens to generate.
            merged: layer -> ``[H, kept, D]`` values for the kept slots (``merge: on``).
        """
        cache = self.model(torch.tensor([context_ids]), use_cache=True).past_key_values
        _cut(cache, kept, merged)
        physical, logical = cache.get_seq_length(), len(context_ids)
        out = self.model(torch.tensor([suffix_ids]), past_key_values=cache, use_cache=True,
                         position_ids=torch.arange(logical, logical + len(suffix_ids))[None],
                         cache_position=torch.arange(physical, physical + len(suffix_ids)))
        token = int(out.logits[0, -1].argmax())
        return [token, *self._decode(cache, token, logical + len(suffix_ids), max_tokens - 1)]

    def _decode(self, cache: object, token: int, logical: int, steps: int) -> list[int]:
        """``steps`` greedy tokens after ``token`` (at logical position ``logical``), appended
        at the cache's next physical slots."""
        physical = cache.get_seq_length()
        generated = []
        for step in range(steps):
            out = self.model(torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                             position_ids=torch.tensor([[logical + step]]),
                             cache_position=torch.tensor([physical + step]))
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
        return generated


def _cut(cache: object, kept: KeptIndices, merged: dict[int, torch.Tensor] | None = None
         ) -> None:
    """Cuts each layer of a transformers cache to its kept indices (``[H][kept]`` or one shared
    ``[kept]`` list), values replaced by ``merged`` where given."""
    for layer_idx, layer in enumerate(cache.layers):
        index = torch.tensor(kept[layer_idx], dtype=torch.long)
        heads, dim = layer.keys.shape[1], layer.keys.shape[3]
        if index.dim() == 1:
            index = index.expand(heads, -1)
        gather = index[None, :, :, None].expand(1, heads, -1, dim)
        layer.keys = layer.keys.gather(2, gather).contiguous()
        layer.values = layer.values.gather(2, gather).contiguous()
        if merged:
            layer.values = merged[layer_idx][None].to(layer.values.dtype).contiguous()


@dataclass
class Compaction:
    """One compaction the reference applied while generating.

    Attributes:
        kind: ``prompt`` (end of prefill, the prompt policy's budget) or ``decode``.
        source_len: tokens held before it (physical).
        kept: tokens kept per layer and KV head.
        layers: layer -> ``[H][kept]`` kept indices (physical, into the held tokens).
    """

    kind: str
    source_len: int
    kept: int
    layers: KeptIndices


def assert_same_compactions(engine_log: list[dict], compactions: list[Compaction],
                            label: object) -> None:
    """The engine's compactions (kind, lengths, kept tokens per layer and KV head) equal the
    reference's, with a message naming what differs."""
    assert [(c["kind"], c["source_len"], c["kept"]) for c in engine_log] == \
        [(c.kind, c.source_len, c.kept) for c in compactions], label
    for number, (mine, theirs) in enumerate(zip(engine_log, compactions, strict=True)):
        for layer, heads in theirs.layers.items():
            for head, (a, b) in enumerate(zip(mine["layers"][layer], heads, strict=True)):
                assert a == b, (f"{label}: compaction {number} layer {layer} head {head}: "
                                f"engine only {sorted(set(a) - set(b))}, reference only "
                                f"{sorted(set(b) - set(a))}")


class CompressedGeneration:
    """Greedy decoding that compresses its own KV cache exactly when the engine must.

    The rule is the engine's (``CompressionSpec.compaction_target``): at the end of the prefill
    the prompt policy's kept count, replaced by ``decode_budget`` when that count (or the whole
    prompt) reaches ``decode_budget + decode_interval``; after every decode step, a cache that
    reaches ``decode_budget + decode_interval`` tokens is cut to ``decode_budget``. Every cut
    makes its OWN selection from this model's own tensors: the keys and values in its cache and
    the last ``window`` post-RoPE queries it computed (prefill and decode steps alike), with
    logical RoPE positions throughout. Merged values (``merge: on``) are applied per layer.

    With ``prefill_budget`` the prompt is prefilled in chunks: after a chunk that is not the
    prompt's last, a cache holding more than ``prefill_budget`` tokens is cut to it (scored by
    the chunk's last ``window`` queries, as the engine's query ring holds them); at the prompt's
    end ``CompressionSpec.prompt_end_target`` decides. Where the chunks end is the scheduler's
    business, not the rule's: ``generate`` takes either the chunk length (a request alone in
    the engine gets chunks of ``max_num_batched_tokens``) or the logical positions at which the
    engine compacted (a mixed batch; each cut still makes its own selection there, and the
    rule's own condition, more than ``prefill_budget`` held, is asserted).

    Exact ties: a repeated token id has the same key norm (RoPE preserves norms) and, at layer
    0, the same value, so key-only scorers meet ties that only rounding breaks; the engine's
    decode-step keys round differently from this model's (other kernels, other batch). Given
    the engine's selections (``engine_log``), a row where the engine kept other tokens is
    accepted only when the swapped tokens' scores, in THIS model's own scores, are equal
    within fp32 rounding (``tolerance``); the reference then continues from the engine's
    choice (``tie_swaps`` counts the tokens). Any other difference stays and fails the test.

    Args:
        reference: the model.
        spec: the request's resolved settings.
        engine_log: the engine's compactions (``layers``: layer -> ``[H][kept]``), or ``None``.
        tolerance: relative score difference treated as a tie.
    """

    def __init__(self, reference: ReferenceModel, spec: object,
                 engine_log: list[dict] | None = None, tolerance: float = 1e-5) -> None:
        self.engine_log = engine_log or []
        self.tolerance = tolerance
        self.tie_swaps = 0
        from vllm_kvcompress.policies import build_policy, load_model_data, model_data_hook
        from vllm_kvcompress.policies.rotary import Rotary

        self.ref = reference
        self.spec = spec
        self.policy = build_policy(spec)
        hook = model_data_hook(spec)
        self.model_data = load_model_data(hook, getattr(spec, hook.param)) if hook else None
        model = reference.model
        self.rotary = Rotary.from_hf(model, model.config.max_position_embeddings)
        #: layer -> ``[Hq, <= window, D]`` the last queries computed.
        self.queries: dict[int, torch.Tensor] = {}
        self.compactions: list[Compaction] = []

    def _remember(self, captured: dict[int, LayerInputs]) -> None:
        window = self.spec.window
        for layer, tensors in captured.items():
            previous = self.queries.get(layer)
            joined = tensors.queries if previous is None else torch.cat(
                [previous, tensors.queries], dim=1)
            self.queries[layer] = joined[:, -window:]

    def _prompt_kept(self, seq_len: int) -> int | None:
        """The scheduler's ``physical_kept``: the largest layer budget, or ``None``."""
        kept = self.spec.kept_tokens(seq_len)
        if kept is None:
            return None
        protected = min(self.spec.sink_tokens + self.spec.window, seq_len)
        kept = max(self.policy.layer_budget(kept, layer, self.ref.num_layers, seq_len, protected)
                   for layer in range(self.ref.num_layers))
        return kept if kept < seq_len else None

    def _compact(self, cache: object, kept: int, logical_len: int, kind: str) -> None:
        from vllm_kvcompress.policies import LayerObservation

        spec, policy = self.spec, self.policy
        source_len = cache.get_seq_length()

        def observe(layer: int) -> LayerObservation:
            keys = cache.layers[layer].keys[0]
            return LayerObservation(
                seq_len=source_len, budget=kept, sink_tokens=spec.sink_tokens,
                window=spec.window, layer_idx=layer, num_layers=self.ref.num_layers,
                num_kv_heads=keys.shape[0], queries=self.queries[layer][:, -spec.window:],
                keys=keys, values=cache.layers[layer].values[0], model_data=self.model_data,
                rotary=self.rotary, logical_len=logical_len)

        chosen: dict[int, torch.Tensor] = {}
        result: KeptIndices = {}
        merged: dict[int, torch.Tensor] = {}
        for layer in range(self.ref.num_layers):
            source = policy.selection_layer(layer)
            if source not in chosen:
                chosen[source] = self._align_ties(observe(source), policy.keep_indices(
                    observe(source)))
            result[layer] = chosen[source].tolist()
            if hasattr(policy, "merged_values"):
                merged[layer] = policy.merged_values(observe(layer), chosen[source])
        for layer_idx, layer in enumerate(cache.layers):
            index = chosen[policy.selection_layer(layer_idx)]
            heads, dim = layer.keys.shape[1], layer.keys.shape[3]
            gather = index[None, :, :, None].expand(1, heads, -1, dim)
            layer.keys = layer.keys.gather(2, gather).contiguous()
            values = merged[layer_idx][None] if layer_idx in merged else \
                layer.values.gather(2, gather)
            layer.values = values.to(layer.keys.dtype).contiguous()
        self.compactions.append(Compaction(kind, source_len, kept, result))

    def _align_ties(self, obs: object, own: torch.Tensor) -> torch.Tensor:
        """``own`` ``[H, kept]``, or the engine's rows where they differ only by tied tokens."""
        number = len(self.compactions)
        if number >= len(self.engine_log):
            return own
        engine = self.engine_log[number]["layers"].get(obs.layer_idx)
        if engine is None or engine == own.tolist():
            return own
        scores = self.policy.score(obs).float()
        candidates = (scores, scores.sum(dim=0, keepdim=True).expand_as(scores))
        aligned = own.clone()
        for head, (mine, theirs) in enumerate(zip(own.tolist(), engine, strict=True)):
            only_mine = sorted(set(mine) - set(theirs))
            only_theirs = sorted(set(theirs) - set(mine))
            if not only_mine or len(only_mine) != len(only_theirs):
                continue
            for table in candidates:
                a = table[head, only_mine].sort().values
                b = table[head, only_theirs].sort().values
                if torch.allclose(a, b, rtol=self.tolerance, atol=self.tolerance * 1e-3):
                    aligned[head] = torch.tensor(theirs, dtype=own.dtype)
                    self.tie_swaps += len(only_mine)
                    break
        return aligned

    def _prefill_cuts(self, prompt_len: int, chunk: int | None) -> list[int]:
        """Logical prompt positions after which the cache is cut to ``prefill_budget``: from
        the engine's own compactions when given, else after every ``chunk`` tokens where the
        cache would hold more than the budget."""
        budget = self.spec.prefill_budget
        if budget is None or self.policy is None:
            return []
        cuts: list[int] = []
        if chunk is None:
            logical = physical = 0
            for entry in self.engine_log:
                if entry["kind"] != "prefill" or logical + entry["source_len"] - physical \
                        >= prompt_len:
                    continue
                logical += entry["source_len"] - physical
                physical = budget
                cuts.append(logical)
            return cuts
        physical = 0
        for end in range(chunk, prompt_len, chunk):
            physical += chunk
            if physical > budget:
                cuts.append(end)
                physical = budget
        return cuts

    def _prefill(self, prompt_ids: list[int], cuts: list[int]) -> tuple[object, torch.Tensor]:
        """Prefills in segments ending at ``cuts`` (then the rest), cutting the cache after
        each; returns the cache and the last logits."""
        from transformers import DynamicCache

        model = self.ref.model
        cache = DynamicCache()
        start = 0
        for end in [*cuts, len(prompt_ids)]:
            physical = cache.get_seq_length()
            with self.ref._capture() as captured:
                out = model(torch.tensor([prompt_ids[start:end]]), past_key_values=cache,
                            use_cache=True, position_ids=torch.arange(start, end)[None],
                            cache_position=torch.arange(physical, physical + end - start))
            self._remember(captured)
            cache = out.past_key_values
            if end < len(prompt_ids):
                held = cache.get_seq_length()
                assert held > self.spec.prefill_budget, (end, held)  # the rule's condition
                self._compact(cache, self.spec.prefill_budget, end, "prefill")
            start = end
        return cache, out.logits

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_tokens: int, chunk: int | None = None
                 ) -> list[int]:
        """``max_tokens`` greedy tokens; ``self.compactions`` records every cut.

        Args:
            prompt_ids: the prompt.
            max_tokens: tokens to generate.
            chunk: with ``prefill_budget``: the engine's chunk length for a request alone
                (else the cut positions come from ``engine_log``).
        """
        model = self.ref.model
        cuts = self._prefill_cuts(len(prompt_ids), chunk)
        if cuts:
            cache, logits = self._prefill(prompt_ids, cuts)
        else:
            with self.ref._capture() as captured:
                out = model(torch.tensor([prompt_ids]), use_cache=True)
            self._remember(captured)
            cache, logits = out.past_key_values, out.logits
        generated = [int(logits[0, -1].argmax())]
        logical = len(prompt_ids)
        prompt_kept = self._prompt_kept(logical) if self.policy is not None else None
        kept = self.spec.prompt_end_target(cache.get_seq_length(), prompt_kept)
        if kept is not None:
            self._compact(cache, kept, logical, "prompt" if kept == prompt_kept else
                          "prefill" if kept == self.spec.prefill_budget else "decode")
        for _ in range(max_tokens - 1):
            physical = cache.get_seq_length()
            with self.ref._capture() as captured:
                out = model(torch.tensor([[generated[-1]]]), past_key_values=cache,
                            use_cache=True, position_ids=torch.tensor([[logical]]),
                            cache_position=torch.tensor([physical]))
            self._remember(captured)
            logical += 1
            generated.append(int(out.logits[0, -1].argmax()))
            kept = self.spec.compaction_target(physical + 1)
            if kept is not None:
                self._compact(cache, kept, logical, "decode")
        return generated
