"""`make soak`: a bounded mixed load against a real `vllm serve` with a deliberately small KV pool.

Sends N requests (default 1,200) from 16 client threads to 127.0.0.1 only: mixed policies and
ratios (and `none`), random prompt lengths (token ids) and output lengths, streaming and not,
random client disconnects mid-stream, client timeouts (server-side aborts), and enough long
generations that the scheduler must preempt. Then it checks:

* zero 5xx responses (and no transport errors other than the deliberate ones);
* the server is alive and answers a plain request;
* vLLM's KV usage gauge returns to 0 once idle: every block back in the pool (no leak);
* a fixed-seed subset of greedy `kv_policy: none` requests, replayed one at a time on the quiet
  server, produce identical tokens: compressed neighbours never corrupted other requests.

It stops by itself: the load has a deadline (`--max-seconds`). Writes runs/soak/soak.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from vllm_kvcompress.local_server import LocalServer, metric_values
from vllm_kvcompress.models.prepare import prepare_tiny_llama

POLICIES = ["none", "snapkv", "chunkkv", "streamingllm", "pyramidkv"]


@dataclass
class Tally:
    """What the load produced (thread-safe counters)."""

    status: dict[int, int] = field(default_factory=dict)
    disconnects: int = 0
    timeouts: int = 0
    transport_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, value: Any = 1) -> None:
        with self.lock:
            if key == "status":
                self.status[value] = self.status.get(value, 0) + 1
            elif key == "error":
                self.transport_errors.append(value)
            else:
                setattr(self, key, getattr(self, key) + value)


def make_request(rng: random.Random, index: int) -> dict[str, Any]:
    """One random request description (fixed by the seed)."""
    policy = rng.choice(POLICIES)
    xargs: dict[str, Any] = {"kv_policy": policy}
    if policy != "none":
        if rng.random() < 0.5:
            xargs["kv_ratio"] = rng.choice([0.05, 0.1, 0.25, 0.5, 1.0])
        else:
            xargs["kv_budget"] = rng.choice([0, 1, 40, 200, 1024])  # <= max_model_len
        xargs["kv_window"] = rng.choice([8, 16, 32])
    prompt_len = rng.choice([20, 60, 200, 400, 700, 900])
    return {
        "index": index,
        "prompt": [rng.randrange(4, 1000) for _ in range(prompt_len)],
        "max_tokens": rng.choice([1, 8, 32, 64, 120]),
        "stream": rng.random() < 0.5,
        "mode": rng.choices(["normal", "disconnect", "timeout"], [0.8, 0.1, 0.1])[0],
        "xargs": xargs,
    }


def send(base_url: str, model: str, req: dict[str, Any], tally: Tally | None,
         timeout: float = 300.0) -> list[int] | None:
    """Sends one completion; returns the generated token ids of a completed greedy request."""
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"],
            "temperature": 0.0, "ignore_eos": True, "stream": req["stream"],
            "return_token_ids": True, "vllm_xargs": req["xargs"]}
    mode = req["mode"] if tally is not None else "normal"
    if mode == "timeout":
        # The client gives up after 50 ms; the server must abort the request and free its KV.
        # requests reports this as Timeout or as ConnectionError(ReadTimeoutError).
        try:
            requests.post(f"{base_url}/v1/completions", json=body, timeout=0.05)
        except requests.RequestException:
            if tally is not None:
                tally.add("timeouts")
        return None
    try:
        with requests.post(f"{base_url}/v1/completions", json=body, stream=req["stream"],
                           timeout=timeout) as resp:
            if tally is not None:
                tally.add("status", resp.status_code)
            if resp.status_code != 200:
                return None
            if not req["stream"]:
                return resp.json()["choices"][0].get("token_ids")
            tokens: list[int] = []
            for n, line in enumerate(resp.iter_lines()):
                if mode == "disconnect" and n >= 2:
                    if tally is not None:
                        tally.add("disconnects")
                    return None  # closing the response drops the connection mid-stream
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    tokens += chunk["choices"][0].get("token_ids") or []
            return tokens
    except requests.RequestException as err:
        if tally is not None:
            tally.add("error", repr(err))
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--blocks", type=int, default=120, help="KV pool size (blocks of 32)")
    parser.add_argument("--max-seconds", type=float, default=1200, help="load deadline")
    parser.add_argument("--replay", type=int, default=40, help="isolation subset size")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    model = str(prepare_tiny_llama(args.out / "tiny-llama"))
    rng = random.Random(args.seed)
    load = [make_request(rng, i) for i in range(args.requests)]
    server = LocalServer(model, ["--enforce-eager", "--dtype", "float32", "--block-size", "32",
                                 "--max-model-len", "1024", "--max-num-seqs", "16",
                                 "--num-gpu-blocks-override", str(args.blocks),
                                 "--kv-policy", "chunkkv", "--kv-ratio", "0.25"],
                         args.out / "server.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    tally = Tally()
    results: dict[int, list[int] | None] = {}
    failures: list[str] = []
    with server:
        start = time.monotonic()
        deadline = start + args.max_seconds
        with ThreadPoolExecutor(args.threads) as pool, tqdm(total=len(load),
                                                            desc="soak requests") as bar:
            def run(req: dict[str, Any]) -> None:
                if time.monotonic() < deadline:
                    results[req["index"]] = send(server.base_url, model, req, tally)
                bar.update()

            list(pool.map(run, load))
        load_seconds = time.monotonic() - start
        # Idle: all requests (aborted ones included) must have released their blocks.
        usage = running = None
        for _ in range(120):
            text = server.metrics()
            running = sum(metric_values(text, "vllm:num_requests_running"))
            usage = max(metric_values(text, "vllm:kv_cache_usage_perc"))
            if running == 0 and usage == 0:
                break
            time.sleep(0.5)
        metrics = server.metrics()
        alive = send(server.base_url, model, {"prompt": [5, 6, 7], "max_tokens": 4,
                                              "stream": False, "mode": "normal",
                                              "xargs": {}}, None) is not None
        # Isolation: greedy `none` requests that completed under load, replayed alone.
        subset = [r for r in load if r["xargs"]["kv_policy"] == "none" and r["mode"] == "normal"
                  and results.get(r["index"])][: args.replay]
        mismatched = [r["index"] for r in tqdm(subset, desc="replay alone")
                      if send(server.base_url, model, r, None) != results[r["index"]]]

    errors_5xx = sum(n for code, n in tally.status.items() if code >= 500)
    report = {
        "requests_sent": len(results), "status_counts": tally.status,
        "errors_5xx": errors_5xx, "client_disconnects": tally.disconnects,
        "client_timeouts_aborts": tally.timeouts, "transport_errors": tally.transport_errors,
        "preemptions": sum(metric_values(metrics, "vllm:num_preemptions_total")),
        "requests_compressed": sum(metric_values(metrics,
                                                 "vllm_kvcompress:requests_compressed_total")),
        "blocks_freed": sum(metric_values(metrics, "vllm_kvcompress:blocks_freed_total")),
        "requests_failed": sum(metric_values(metrics, "vllm_kvcompress:requests_failed_total")),
        "kv_usage_when_idle": usage, "running_when_idle": running, "alive_at_end": alive,
        "replayed": len(subset), "replay_mismatches": mismatched,
        "load_seconds": round(load_seconds, 1), "seed": args.seed, "pool_blocks": args.blocks,
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if len(results) < args.requests:
        failures.append(f"deadline hit: only {len(results)} of {args.requests} requests sent")
    if errors_5xx:
        failures.append(f"{errors_5xx} responses were 5xx")
    if tally.transport_errors:
        failures.append(f"{len(tally.transport_errors)} unexpected transport errors")
    if not alive:
        failures.append("server did not answer after the load")
    if usage != 0 or running != 0:
        failures.append(f"not idle after the load: usage {usage}, running {running} (leak?)")
    if mismatched:
        failures.append(f"{len(mismatched)} replayed requests differ: {mismatched}")
    if report["preemptions"] == 0:
        failures.append("no preemption happened: the pool is not small enough to test it")
    for failure in failures:
        print(f"SOAK FAILED: {failure}", file=sys.stderr)
    if not failures:
        print(f"SOAK PASSED: {len(results)} requests in {load_seconds:.0f} s, 0 5xx, "
              f"{report['preemptions']:.0f} preemptions, {tally.disconnects} disconnects, "
              f"{tally.timeouts} timeouts, usage back to 0, {len(subset)} replays identical")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
