"""The last ``window`` post-RoPE queries of each request, per layer, kept across steps.

Scoring policies (SnapKV, TOVA, ...) score keys with the queries of the most recent ``window``
tokens. At the end of a prompt those come from the prefill's chunks; during decoding
(``decode_budget``) one query per step arrives and a compaction every ``decode_interval`` steps
reads the last ``window`` of them. Keeping them per request in a Python list of tensors would cost
one small copy per request per layer per step; here every request of a window size owns one slot
of a preallocated pool per layer, ``[capacity, window, num_q_heads, head_dim]``, and a step writes
all its requests' rows into it with ONE indexed copy per layer (a ring: token ``t`` of a request
lands in row ``t % window``).

Memory: ``num_layers * window * num_q_heads * head_dim * dtype bytes`` per request slot (SmolLM2,
window 32, fp32: 2.2 MiB; Llama-3-8B, window 64, bf16: 16 MiB), reported by ``nbytes`` and on
``/metrics`` (the workers report it with each step's output when it changed). A window size's
pools grow by doubling while requests of that size are live and are released when its last
request is, so distinct window values cannot pile up; the window itself is bounded at admission
(``--kv-max-window``). A write that fails (memory) fails only the requests of that window size
(``write`` returns them), never the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RingWrite:
    """One step's writes for one window size.

    Attributes:
        window: the ring length.
        rows: ``[n]`` int64, rows of the step's flattened batch (query tensor) to keep.
        slots: ``[n]`` int64, each row's request slot in the pool.
        positions: ``[n]`` int64, each row's place in its ring (``token index % window``).
        capacity: slots the pool must hold for this step.
        req_ids: the requests written (they fail together if the write fails).
    """

    window: int
    rows: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    capacity: int
    req_ids: tuple[str, ...] = ()

    @property
    def flat(self) -> torch.Tensor:
        """``[n]`` each row's index into the pool viewed as ``[capacity * window, Hq, D]``."""
        return self.slots * self.window + self.positions


class QueryRing:
    """Rings of queries for the requests of one worker.

    Args:
        num_layers: attention layers of the model.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        #: window -> per layer pool ``[capacity, window, Hq, D]`` (allocated on first write).
        self._pools: dict[int, list[torch.Tensor | None]] = {}
        #: request id -> (window, slot).
        self._slot: dict[str, tuple[int, int]] = {}
        #: request id -> queries written so far (its ring holds the last ``window``).
        self._count: dict[str, int] = {}
        self._free: dict[int, list[int]] = {}
        self._used: dict[int, int] = {}
        self._writes: list[RingWrite] = []
        self._nbytes = 0
        self._device_indices: tuple[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] | \
            None = None

    # --- per step ---------------------------------------------------------------------------

    def plan(self, entries: list[tuple[str, int, int, int]]) -> None:
        """Lays out this step's writes.

        Args:
            entries: ``(request id, window, query_start, query_end)`` per request whose queries
                this step are kept (rows ``query_start .. query_end-1`` of the step's batch).
        """
        self._drop_idle_pools()
        by_window: dict[int, tuple[list[int], list[int], list[int]]] = {}
        ids: dict[int, list[str]] = {}
        for req_id, window, start, end in entries:
            slot = self._assign(req_id, window)
            count = self._count.get(req_id, 0)
            # Only the last ``window`` rows of a long chunk survive in the ring.
            first = max(start, end - window)
            ids.setdefault(window, []).append(req_id)
            rows, slots, positions = by_window.setdefault(window, ([], [], []))
            for row in range(first, end):
                rows.append(row)
                slots.append(slot)
                positions.append((count + row - start) % window)
            self._count[req_id] = count + end - start
        self._device_indices = None
        self._writes = [
            RingWrite(window, torch.tensor(rows, dtype=torch.int64),
                      torch.tensor(slots, dtype=torch.int64),
                      torch.tensor(positions, dtype=torch.int64), self._used[window],
                      tuple(ids[window]))
            for window, (rows, slots, positions) in by_window.items()]

    @property
    def has_writes(self) -> bool:
        return bool(self._writes)

    def write(self, layer_idx: int, query: torch.Tensor) -> list[tuple[str, ...]]:
        """Stores this step's planned rows of one layer.

        Args:
            layer_idx: the attention layer.
            query: ``[num_tokens, Hq, D]`` the step's post-RoPE queries of that layer.

        Returns:
            The requests of each window size whose write failed (allocation, usually): the
            caller fails them; the other window sizes were written.
        """
        failed: list[tuple[str, ...]] = []
        if not self._writes:
            return failed
        for write, (rows, flat) in zip(self._writes, self._indices(query.device), strict=True):
            try:
                pool = self._pool(write.window, layer_idx, query, write.capacity)
                # One index_copy_ per layer: the cheapest scatter (no advanced-index assignment).
                pool.view(-1, *pool.shape[2:]).index_copy_(0, flat, query.index_select(0, rows))
            except Exception:  # reported to the caller, which fails these requests alone
                failed.append(write.req_ids)
        if failed:
            lost = {req_id for ids in failed for req_id in ids}
            self._writes = [w for w in self._writes if not lost & set(w.req_ids)]
            self._device_indices = None
        return failed

    # --- per request ------------------------------------------------------------------------

    def read(self, req_id: str, layer_idx: int) -> torch.Tensor | None:
        """``[n, Hq, D]`` the request's last ``n <= window`` queries of a layer, oldest first
        (``None`` when none were kept)."""
        placed = self._slot.get(req_id)
        if placed is None:
            return None
        window, slot = placed
        pool = self._pools[window][layer_idx] if window in self._pools else None
        if pool is None:
            return None
        count = self._count.get(req_id, 0)
        if count < window:
            return pool[slot, :count]
        order = (torch.arange(window) + count) % window
        return pool[slot, order.to(pool.device)]

    def count(self, req_id: str) -> int:
        """Queries written for the request so far."""
        return self._count.get(req_id, 0)

    def release(self, req_id: str) -> None:
        """Forgets a request (finished, preempted, or compressed with nothing left to score);
        a window size's pools go when its last request does."""
        placed = self._slot.pop(req_id, None)
        self._count.pop(req_id, None)
        if placed is None:
            return
        self._free.setdefault(placed[0], []).append(placed[1])

    def _drop_idle_pools(self) -> None:
        """Releases the pools of window sizes no live request uses (between steps)."""
        for window in [w for w, used in self._used.items()
                       if len(self._free.get(w, ())) == used]:
            for pool in self._pools.pop(window, ()):
                self._nbytes -= _size(pool)
            self._free.pop(window, None)
            self._used.pop(window, None)

    @property
    def nbytes(self) -> int:
        """Bytes held by the pools (all windows, all layers); kept up to date as pools grow and
        go, since the worker reads it after every step."""
        return self._nbytes

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._slot

    # --- internals --------------------------------------------------------------------------

    def _assign(self, req_id: str, window: int) -> int:
        placed = self._slot.get(req_id)
        if placed is not None:
            if placed[0] == window:
                return placed[1]
            self.release(req_id)  # a new window size (never within one request's life)
        free = self._free.setdefault(window, [])
        if free:
            slot = free.pop()
        else:
            slot = self._used.get(window, 0)
            self._used[window] = slot + 1
        self._used.setdefault(window, slot + 1)
        self._slot[req_id] = (window, slot)
        self._count[req_id] = 0
        return slot

    def _indices(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This step's (rows, flat pool index) per write, on ``device`` (moved once a step)."""
        if self._device_indices is None or self._device_indices[0] != device:
            self._device_indices = (device, [(w.rows.to(device), w.flat.to(device))
                                             for w in self._writes])
        return self._device_indices[1]

    def _pool(self, window: int, layer_idx: int, query: torch.Tensor, capacity: int
              ) -> torch.Tensor:
        pools = self._pools.setdefault(window, [None] * self.num_layers)
        pool = pools[layer_idx]
        if pool is None or pool.shape[0] < capacity:
            size = max(capacity, 2 * (0 if pool is None else pool.shape[0]), 4)
            grown = torch.zeros((size, window, *query.shape[1:]), dtype=query.dtype,
                                device=query.device)
            if pool is not None:
                grown[: pool.shape[0]] = pool
            self._nbytes += _size(grown) - _size(pool)
            pools[layer_idx] = pool = grown
        return pool


def _size(pool: torch.Tensor | None) -> int:
    return 0 if pool is None else pool.numel() * pool.element_size()
