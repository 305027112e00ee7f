"""Runs the tiny model with compression at a given tensor-parallel size and prints the result as
JSON (used by tests/test_tensor_parallel.py; a script because the mp executor spawns workers,
which re-import this module and so register the test policy below in every rank).

Usage: python tests/tp_script.py '{"model": ..., "tp": 2, "cases": [...], ...}'
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from vllm_kvcompress.policies import PolicyInfo, register_policy


class RankOneFails:
    """Scores like StreamingLLM, but scoring raises on tensor-parallel rank 1 (a fault there)."""

    inputs = frozenset({"window_attention"})
    head_select = "shared"

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int, seq_len: int,
                     protected: int) -> int:
        return budget

    def selection_layer(self, layer_idx: int) -> int:
        return layer_idx

    def score(self, obs: Any) -> torch.Tensor:
        from vllm.distributed import get_tp_group

        if get_tp_group().rank_in_group == 1 and obs.layer_idx == 1:
            raise RuntimeError("simulated fault on rank 1")
        return torch.arange(obs.seq_len, dtype=torch.float32).expand(obs.num_kv_heads, -1)

    def select(self, obs: Any, scores: torch.Tensor) -> torch.Tensor:
        keep = torch.cat([torch.arange(obs.sink_tokens),
                          torch.arange(obs.seq_len - obs.budget + obs.sink_tokens, obs.seq_len)])
        return keep.expand(obs.num_kv_heads, -1)

    def keep_indices(self, obs: Any) -> torch.Tensor:
        return self.select(obs, self.score(obs))


register_policy(PolicyInfo(name="test-rank-one-fails", build=lambda spec: RankOneFails(),
                           paper="-", summary="fails on TP rank 1"))


def kept_log(worker: Any) -> dict[str, Any]:
    return worker.model_runner._kvcompress.kept_log


def compaction_log(worker: Any) -> dict[str, Any]:
    return worker.model_runner._kvcompress.compaction_log


def main() -> None:
    from vllm import LLM, SamplingParams

    cfg = json.loads(sys.argv[1])
    llm = LLM(model=cfg["model"], tensor_parallel_size=cfg["tp"],
              distributed_executor_backend="mp" if cfg["tp"] > 1 else None, **cfg["engine"])
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    outs = llm.generate([{"prompt_token_ids": p} for p in cfg["prompts"]],
                        [SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0,
                                        ignore_eos=True, extra_args=x) for x in cfg["cases"]],
                        use_tqdm=False)
    then = {}
    if cfg.get("then"):
        # Second requests after the first ones finished (the same settings, e.g. a context
        # followed by a question that reuses its compressed prefix).
        later = llm.generate([{"prompt_token_ids": p} for p in cfg["then"]],
                             [SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0,
                                             ignore_eos=True, extra_args=x)
                              for x in cfg["cases"]], use_tqdm=False)
        then = {"then_tokens": [list(o.outputs[0].token_ids) for o in later],
                "then_cached": [o.num_cached_tokens for o in later]}
    logs = llm.collective_rpc(kept_log)
    every = llm.collective_rpc(compaction_log)
    stats = llm.llm_engine.engine_core.engine_core.scheduler._kvcompress.stats
    per_rank = []
    for log in logs:
        per_rank.append({out.request_id: log[key] for out in outs for key in log
                         if key.rsplit("-", 1)[0] == out.request_id})
    print("RESULT=" + json.dumps({
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "finish": [o.outputs[0].finish_reason for o in outs],
        "ids": [o.request_id for o in outs],
        "kept": per_rank,
        "compactions": [{out.request_id: log[key] for out in outs for key in log
                         if key.rsplit("-", 1)[0] == out.request_id} for log in every],
        "blocks_freed": stats.blocks_freed,
        "free_before": free_before,
        "free_after": pool.get_num_free_blocks(),
        **then,
    }))


if __name__ == "__main__":
    main()
