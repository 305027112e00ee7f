"""The Qwen2.5 study (``make bench-eval`` / ``make bench-peer``, ``runs/qwen-eval``): per setting,
ours and kvpress on the same prompts, per task with intervals, paired differences, the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...eval.configs import QUERY_AGNOSTIC, QUERY_AWARE
from ...eval.summary import MIN_PAIRED_PROMPTS
from ...eval.tasks import TASKS
from .cells import cell, ci_text, copy_image, entry_label, order, settings_line
from .variants import head_modes_section, prefill_section

SETTING_TITLES = {QUERY_AWARE: "Query-aware (the question in the prompt when it is compressed)",
                  QUERY_AGNOSTIC: "Query-agnostic (the context compressed before the question "
                                  "exists)"}


def only_setting(result: dict[str, Any], setting: str) -> dict[str, Any]:
    """``result`` with its summary, comparison and targets of one setting (entries written
    before settings existed are query-aware)."""
    def mine(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [i for i in items if (i.get("setting") or QUERY_AWARE) == setting]

    return {**result, "summary": mine(result["summary"]),
            "comparison": mine(result.get("comparison", [])),
            "targets": mine(result.get("targets", []))}


def qwen_section(result: dict[str, Any], images: Path, run: Path) -> list[str]:
    """Every setting the store holds (or was asked for): what did not run, the all-tasks table
    ours vs kvpress with paired differences, the per-task table, the per-task plot."""
    settings = result["settings"]
    model = next(iter(settings.values()), {}).get("model", "?")
    lines = [f"## Qwen2.5 study (`{model}`, {run.name})", "",
             "The model is Qwen2.5-Coder-Instruct **dequantized from the Q4_K_M GGUF** (docs/"
             "models.md), not the original bf16 release. Ours runs in vLLM, kvpress in HF "
             "transformers, on the same prompts (same token ids); mean [bootstrap 95% CI over "
             "prompts] (n: the prompts a configuration answered; each is over its own); "
             "\"ours - kvpress\" is paired over the prompts both answered, \">=\" holds when "
             "its upper bound reaches 0, and needs at least "
             f"{MIN_PAIRED_PROMPTS} common prompts (docs/eval-plan.md's sizing rule). Runs:",
             ""]
    for backend, mine in settings.items():
        lines.append(f"- {backend}: {settings_line(mine)}")
    ignored = {b: n for b, n in (result.get("ignored_rows") or {}).items() if n}
    if ignored:
        lines.append("- rows the store holds made on other prompts or settings (not counted): "
                     + ", ".join(f"{b} {n}" for b, n in ignored.items()))
    present = {s.get("setting") or QUERY_AWARE for s in result["summary"]}
    asked = {item["setting"] for item in result.get("not_run", [])}
    for setting in [s for s in SETTING_TITLES if s in present | asked]:
        lines += ["", f"### {SETTING_TITLES[setting]}", ""]
        lines += [f"_{item['backend']} (ours)_: not run in this setting: {item['why']}."
                  for item in result.get("not_run", []) if item["setting"] == setting]
        mine = only_setting(result, setting)
        if mine["summary"]:
            lines += [*_all_tasks(mine), "", *_per_task(mine)]
        modes = head_modes_section(mine, run) if setting == QUERY_AWARE else []
        if modes:
            lines += ["", "#### Both head modes (`shared`: one token set per layer; `per_head`: "
                      "each KV head its own)", "",
                      "Same prompts, same store; the difference is paired over prompts. "
                      "A method's default is the mode a request gets when it names none "
                      "(`kv_head_select`).", "", *modes]
        prefill = prefill_section(mine, run, TASKS) if setting == QUERY_AWARE else []
        if prefill:
            lines += ["", "#### Compressed while prefilling vs at the prompt's end", "",
                      "The `prefill` variant (`--prefill-variant`) sets `kv_prefill_budget` to "
                      "what the configuration's ratio keeps of each prompt, so both end holding "
                      "the same tokens' worth; it cuts after every chunk of "
                      f"{_chunk_of(settings)} tokens, scoring with that chunk's own last window, "
                      "where the other sees the whole prompt (question included) once. Same "
                      "prompts, same store; the difference is paired over prompts.", "",
                      *prefill]
        prefix = "qwen" if run.name == "qwen-eval" else run.name.replace("-", "_")
        path = copy_image(run / f"accuracy_by_task_{setting}.png", images,
                          f"{prefix}_accuracy_by_task_{setting}.png")
        if path:
            lines += ["", f"![{setting}: accuracy vs kept ratio per task]({path})"]
    return [*lines, ""]


def _chunk_of(settings: dict[str, Any]) -> str:
    """The chunk the store's prefill rows were cut at, as text (settings written before it was
    recorded: the last engine run's ``max_num_batched_tokens``)."""
    vllm = settings.get("vllm") or {}
    chunk = vllm.get("prefill_chunk") or vllm.get("max_num_batched_tokens")
    return "?" if chunk is None else f"{chunk:,}"


def _all_tasks(result: dict[str, Any]) -> list[str]:
    """Per method and ratio: ours and kvpress over all tasks (turn 1), the paired difference,
    and multi-turn's turn 2."""
    summary = [s for s in result["summary"] if not s.get("variant")]
    peers = {(s["policy"], s["ratio"]): s for s in summary if s["backend"] == "kvpress"}
    pairs = {(c["policy"], c["ratio"], c["head_select"]): c for c in result["comparison"]
             if c["match"] == "nominal" and not c.get("variant")}
    lines = ["| method | kept ratio | ours (n) | kvpress (n) | ours - kvpress (paired n) | "
             "ours >= kvpress | turn 2, ours | turn 2, kvpress |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    ours = sorted((s for s in summary if s["backend"] == "vllm"), key=order)
    for s in ours or sorted(peers.values(), key=order):
        peer = peers.get((s["policy"], s["ratio"])) if s["backend"] == "vllm" else s
        mine = s if s["backend"] == "vllm" else None
        pair = pairs.get((s["policy"], s["ratio"], s.get("head_select") or "shared"))
        diff = "-" if pair is None else (f"{ci_text(pair['diff'], pair['diff_ci'], 3)} "
                                         f"({pair['samples']})")
        holds = ("-" if pair is None else "too few prompts" if not pair.get("enough", True)
                 else "yes" if pair["ge"] else "**no**")
        lines.append(f"| {entry_label(s)} | {s['ratio']:g} | {_with_n(mine)} | "
                     f"{_with_n(peer)} | {diff} | {holds} | "
                     f"{cell(mine, 'turn2')} | {cell(peer, 'turn2')} |")
    return lines


def _with_n(entry: dict[str, Any] | None) -> str:
    """``0.57 [0.42, 0.71] (40)``: an entry's accuracy and how many prompts it covers."""
    return "-" if entry is None else f"{cell(entry, 'accuracy')} ({entry['samples']})"


def _per_task(result: dict[str, Any]) -> list[str]:
    """Per method, ratio and backend: every task's mean [CI] (turn 1)."""
    summary = sorted((s for s in result["summary"] if not s.get("variant")),
                     key=lambda s: (*order(s), s["backend"] != "vllm"))
    tasks = [t for t in TASKS if any(s.get(t) is not None for s in summary)]
    lines = ["Per task (turn 1):", "",
             "| method | kept ratio | backend | " + " | ".join(tasks) + " |",
             "|---|---:|---|" + "---:|" * len(tasks)]
    for s in summary:
        who = "ours" if s["backend"] == "vllm" else "kvpress"
        lines.append(f"| {entry_label(s)} | {s['ratio']:g} | {who} | "
                     + " | ".join(cell(s, t) for t in tasks) + " |")
    return lines


def qwen_headline(result: dict[str, Any], name: str = "Qwen2.5") -> list[str]:
    """The page's opening lines on a Qwen study (``name`` starts each): full KV, then each kept
    ratio's methods from best to worst over all tasks (ours), per setting."""
    lines = []
    for setting in SETTING_TITLES:
        # Ranked only over full KV's prompts: a method run on a subset is in the tables.
        ours = [s for s in only_setting(result, setting)["summary"]
                if s["backend"] == "vllm" and not s.get("variant")
                and s.get("full_kv_prompts", True)]
        base = next((s for s in ours if s["policy"] == "none"), None)
        if base is None:
            continue
        mode = setting.replace("_", "-")
        lines.append(f"- {name}, {mode}: full KV {cell(base, 'accuracy')} over all tasks "
                     f"({base['samples']} prompts).")
        for ratio in sorted({s["ratio"] for s in ours if s["policy"] != "none"}, reverse=True):
            row = sorted((s for s in ours if s["ratio"] == ratio), key=lambda s: -s["accuracy"])
            lines.append(f"- {name}, {mode}, kept ratio {ratio:g}: " + ", ".join(
                f"{entry_label(s)} {s['accuracy']:.2f}" for s in row) + ".")
    return lines
