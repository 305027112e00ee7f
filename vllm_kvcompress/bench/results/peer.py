"""Ours vs NVIDIA kvpress on the same prompts: paired differences with intervals, multi-turn,
and the notes on where the two implementations differ by design."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cells import cell, ci_text, copy_image, entry_label, fmt, order, settings_line

METHOD_NOTES = """\
Where the two implementations differ by design (same names, same ratios, same prompts):

- **Which tokens, per head or per layer** (the "kvpress mode" column). kvpress's ScorerPress
  presses (SnapKV, PyramidKV, StreamingLLM) take a top-k over each KV head's scores: every head
  keeps the same number of tokens, but not the same tokens (`per_head`; for StreamingLLM the
  scores are positional, so every head keeps the same ones). Its ChunkKVPress sums the heads'
  scores and keeps one token set per layer (`shared`). Ours is `shared` by default (one token set
  per layer, which lets whole blocks of vLLM's single block table go back to the pool); rows
  named `policy[per_head]` ran with `--head-select per_head` (each KV head its own tokens).
- **Budget rounding and protected tokens.** kvpress keeps `int(L x ratio)` tokens (rounded down),
  sinks and window inside that budget; we keep `ceil(L x ratio)`, with `sink_tokens + window`
  as a floor. Our SnapKV/ChunkKV also keep 4 sink tokens; kvpress's do not. Our key-only
  methods (Knorm, KeyDiff, Q-Filters) keep the 4 sinks and the 32-token window before ranking;
  kvpress's KnormPress, KeyDiffPress and QFilterPress rank every token. For Knorm at 0.5 this
  is the one cell where ours is measurably below kvpress; run without that protection
  (`--sink-tokens 0 --window 1`) ours is not (docs/ARCHITECTURE.md, Evaluation).
- **ChunkKV.** Both score chunks of 10 tokens by their mean score; kvpress keeps whole chunks
  only (a little under the budget), we fill the budget exactly. Neither reuses indices across
  layers here (`reuse_layers=1`). Chunk boundaries differ: kvpress's chunks start at token 0 of
  the prompt, ours at the first token after the 4 sinks. SmolLM2 spells a number one token per
  digit, so a 7-digit needle value straddles two chunks whenever a boundary falls inside it,
  and a straddling value tends to be kept in part. The prompts are built so that no grid is
  favoured: each needle moves 1-2 sentences from its depth's position (inwards at depth 0 and
  1, either way in between, seeded per prompt) on top of a random start in the essays, so its
  first token lands at a different offset in every prompt, depth 0 included (`needle_offset` in
  results.csv). The ablation below runs our ChunkKV with its grid at token 0 (`--sink-tokens 0`)
  on the same prompts.
- **PyramidKV.** kvpress gives every layer its own budget (falling linearly with depth, same
  total). We keep the largest layer budget in every layer (one block table per request), so at
  the same nominal ratio ours holds more memory: the "held" columns give the prompt tokens held
  per layer as a fraction of the prompt (ours: the largest layer budget; kvpress: the mean over
  layers). Rows matched "held" pair our PyramidKV with kvpress's PyramidKV run at our held
  ratio, i.e. at the same memory; rows matched "nominal" are not like-for-like for PyramidKV.
- **Multi-turn.** Turn 2 is a new request whose prompt is turn 1's prompt, turn 1's generated
  tokens as they came out (end-of-turn token dropped), then the chat template's end of that
  turn and a new user question about the *other* needle of the same context. Ours runs it in
  the engine with prefix caching on, after turn 1 has finished: the turn-1 part hits the cache,
  the window is recomputed and the whole turn-2 prompt is compressed with the same
  configuration (turn 2's question in the window). kvpress runs a fresh query-aware prefill of
  the full turn-2 ids with the same press (nothing of turn 1's compressed cache is reused), as
  its runner does for turn 1. Turn-2 prompts differ between configurations when their turn-1
  answers do.
- **Engine.** Ours runs inside vLLM (paged KV, CPU_ATTN, chunked prefill, the prompt's KV reused
  from the prefix cache for every compressed variant); kvpress runs HF transformers (SDPA) and
  prefills the prompt once per sample, replaying each press on the captured layer inputs when
  the runner's shared prefill is on. Both run the model in float32 and decode greedily.
- **Statistics.** Brackets are percentile-bootstrap 95% intervals over prompts (1000 resamples,
  fixed seed). "ours - kvpress" resamples the prompts in pairs (the same prompts for both);
  "ours >= kvpress" holds when that interval's upper bound is 0 or above, i.e. the prompts do
  not show ours worse at 95%.
"""


def peer_section(result: dict[str, Any], images: Path, run: Path, plots: bool = True
                 ) -> list[str]:
    """Ours vs kvpress on the same prompts: paired differences with intervals, multi-turn.

    ``plots``: copy the run's PNGs (False when the accuracy section showed them already)."""
    lines = ["## Ours vs NVIDIA kvpress, same prompts, same model", ""]
    for backend, settings in result["settings"].items():
        lines.append(f"- {backend}: {settings_line(settings)}")
    table = {(s["backend"], s["policy"], s["ratio"], s.get("head_select", "shared")): s
             for s in result["summary"] if not s.get("variant")}
    comparison = [c for c in result.get("comparison", []) if not c.get("variant")]
    lines += ["", "All tasks, turn 1. ours and kvpress: mean [bootstrap 95% CI]; ours - kvpress: "
              "mean [paired bootstrap 95% CI] over the prompts both answered; \"ours >= "
              "kvpress\" holds when that interval's upper bound is 0 or above. \"matched\": "
              "nominal (same kept ratio) or held (kvpress's PyramidKV run at our held ratio, same "
              "memory).", "",
              "| config | kept ratio | matched | kvpress ratio | kvpress mode | held, ours | "
              "held, kvpress | n | ours | kvpress | ours - kvpress | ours >= kvpress |",
              "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in sorted(comparison, key=lambda c: (c["policy"] != "none", c["policy"],
                                               c["head_select"] != "shared", c["head_select"],
                                               -c["ratio"], c["match"])):
        ours = table.get(("vllm", c["policy"], c["ratio"], c["head_select"]))
        peer = table.get(("kvpress", c["policy"], c["kvpress_ratio"], c["kvpress_mode"]))
        lines.append(
            f"| {c['label']} | {c['ratio']:g} | {c['match']} | {c['kvpress_ratio']:g} | "
            f"{c['kvpress_mode']} | {fmt(c['ours_held_ratio'])} | "
            f"{fmt(c['kvpress_held_ratio'])} | {c['samples']} | {cell(ours, 'accuracy')} | "
            f"{cell(peer, 'accuracy')} | {ci_text(c['diff'], c['diff_ci'], 3)} | "
            f"{'yes' if c['ge'] else '**no**'} |")
    misses = [c for c in comparison if not c["ge"] and c["policy"] != "none"]
    if comparison:
        named = ", ".join(f"{c['label']} {c['ratio']:g} ({c['match']}: "
                          f"{ci_text(c['diff'], c['diff_ci'], 3)})" for c in misses)
        lines += ["", f"Cells where \"ours >= kvpress\" misses: {named or 'none'}."]
    multi = [s for s in result["summary"] if s.get("turn2") is not None]
    if multi:
        lines += ["", "Multi-turn, the same prompts' two turns (turn 2 asks about the other "
                  "needle; mean [bootstrap 95% CI]):", "",
                  "| backend | config | kept ratio | held | n | turn 1 | turn 2 |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for s in sorted(multi, key=lambda s: (s["backend"] != "vllm", *order(s))):
            lines.append(f"| {s['backend']} | {entry_label(s)} | {s['ratio']:g} | "
                         f"{fmt(s.get('held_ratio'))} | {s.get('turn2_samples', '-')} | "
                         f"{cell(s, 'niah_multiturn')} | {cell(s, 'turn2')} |")
    for src, name, alt in (("accuracy_vs_ratio.png", "peer_accuracy_vs_ratio.png",
                            "ours vs kvpress"),
                           ("heatmap_kvpress.png", "peer_heatmap_kvpress.png",
                            "kvpress needle heatmaps"),
                           ("heatmap_vllm.png", "peer_heatmap_vllm.png", "our needle heatmaps")):
        path = copy_image(run / src, images, name) if plots or "kvpress" in src else None
        if path:
            lines += ["", f"![{alt}]({path})"]
    return [*lines, "", METHOD_NOTES]


#: Method families, one plot each (methods not listed fall into "other").
