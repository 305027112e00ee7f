"""Reference decoding with plain transformers: full prefill, then attend only to kept tokens.

This is the oracle for the engine's eviction: the prompt is prefilled with full attention (the
engine's first token also comes from full attention, since each layer is compacted after its own
attention), then each layer's KV cache is cut to the engine's kept indices, and greedy decoding
continues with LOGICAL positions for RoPE (``position_ids``) and physical cache positions.
Benchmarks import it from here.
"""

from __future__ import annotations

from pathlib import Path

import torch


class ReferenceModel:
    """A Hugging Face causal LM in fp32 on CPU.

    Args:
        model_dir: folder with config, weights and tokenizer.
    """

    def __init__(self, model_dir: Path | str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval()

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], max_tokens: int,
               kept: dict[int, list[int]] | None = None) -> list[int]:
        """Greedy continuation of ``prompt_ids``.

        Args:
            prompt_ids: the prompt's token ids (length ``L``).
            max_tokens: tokens to generate.
            kept: layer -> sorted kept prompt indices; ``None`` keeps everything.

        Returns:
            ``max_tokens`` generated token ids.
        """
        out = self.model(torch.tensor([prompt_ids]), use_cache=True)
        cache = out.past_key_values
        token = int(out.logits[0, -1].argmax())
        generated = [token]
        if kept is not None:
            for layer_idx, layer in enumerate(cache.layers):
                index = torch.tensor(kept[layer_idx], dtype=torch.long)
                layer.keys = layer.keys[:, :, index].contiguous()
                layer.values = layer.values[:, :, index].contiguous()
        physical = cache.get_seq_length()
        logical = len(prompt_ids)
        for step in range(max_tokens - 1):
            out = self.model(torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                             position_ids=torch.tensor([[logical + step]]),
                             cache_position=torch.tensor([physical + step]))
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
        return generated
