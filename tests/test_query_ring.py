"""The per-request query ring against a plain list that keeps the last ``window`` rows."""

from __future__ import annotations

import random

import torch

from vllm_kvcompress.engine.query_ring import QueryRing


def test_ring_keeps_each_requests_last_window_queries_across_steps() -> None:
    """Random chunk sizes (prefill chunks longer than the window, single decode rows),
    requests joining and leaving, two window sizes, slots reused after release: every read
    equals the last ``window`` rows the request was given, oldest first, on every layer."""
    rng = random.Random(0)
    layers, heads, dim = 3, 5, 4
    ring = QueryRing(layers)
    expected: dict[str, list[torch.Tensor]] = {}
    windows: dict[str, int] = {}
    for step in range(60):
        live = list(expected)
        if len(live) < 6 and rng.random() < 0.4:
            req = f"r{step}"
            windows[req] = rng.choice([4, 7])
            expected[req] = []
            live.append(req)
        if live and rng.random() < 0.15:
            gone = rng.choice(live)
            ring.release(gone)
            del expected[gone]
            live.remove(gone)
        entries, start = [], 0
        for req in rng.sample(live, k=len(live)):  # batch order changes every step
            n = rng.choice([1, 1, 1, 3, 9])
            entries.append((req, windows[req], start, start + n))
            start += n
        ring.plan(entries)
        query = [torch.randn(start, heads, dim) for _ in range(layers)]
        for layer in range(layers):
            ring.write(layer, query[layer])
        for req, _, first, last in entries:
            expected[req].extend(torch.stack([q[first:last] for q in query], dim=1))
        for req, rows in expected.items():
            for layer in range(layers):
                want = torch.stack([row[layer] for row in rows[-windows[req]:]]) \
                    if rows else None
                got = ring.read(req, layer)
                if want is None:
                    assert got is None or got.shape[0] == 0
                else:
                    assert torch.equal(got, want), (step, req, layer)
            assert ring.count(req) == len(rows)
        # The running byte count (read by the worker after every step) matches the pools.
        assert ring.nbytes == sum(t.numel() * t.element_size() for pools in
                                  ring._pools.values() for t in pools if t is not None)
    assert ring.nbytes > 0


def test_one_indexed_copy_per_layer_and_window() -> None:
    """A step of many single-row decode requests is one write per (layer, window size)."""
    ring = QueryRing(2)
    ring.plan([(f"r{i}", 8, i, i + 1) for i in range(64)])
    assert len(ring._writes) == 1 and ring._writes[0].rows.tolist() == list(range(64))
    ring.write(0, torch.randn(64, 3, 2))
    assert ring._pools[8][0].shape[0] >= 64


def test_pools_of_window_sizes_no_request_uses_are_released() -> None:
    """Many distinct window values, one after the other: memory follows the live requests and
    returns to zero, instead of keeping a pool per value ever seen."""
    ring = QueryRing(2)
    peak = 0
    for window in range(1, 200, 3):
        ring.plan([(f"r{window}", window, 0, 5)])
        ring.write(0, torch.randn(5, 3, 2))
        ring.write(1, torch.randn(5, 3, 2))
        peak = max(peak, ring.nbytes)
        ring.release(f"r{window}")
    ring.plan([])
    assert ring.nbytes == 0 and not ring._pools
    assert peak <= 2 * 4 * 199 * 3 * 2 * 4  # one window's pools at a time


def test_a_failed_write_fails_only_that_window_sizes_requests() -> None:
    """An allocation that fails (here: a pool that cannot be created) is returned as the
    requests to fail; the other window size is written and reads back."""
    ring = QueryRing(1)
    ring.plan([("a", 4, 0, 2), ("b", 8, 2, 4)])
    original = ring._pool

    def failing(window: int, *args: object) -> torch.Tensor:
        if window == 8:
            raise RuntimeError("out of memory")
        return original(window, *args)

    ring._pool = failing  # type: ignore[method-assign]
    query = torch.randn(4, 3, 2)
    assert ring.write(0, query) == [("b",)]
    assert torch.equal(ring.read("a", 0), query[0:2])
