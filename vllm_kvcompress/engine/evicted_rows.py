"""Tokens evicted per block-table row: the offset between logical and physical positions.

After a compaction a request's block-table row holds fewer tokens than its logical length; its
KV for logical position ``p`` (a newly computed token) lives at physical index ``p - evicted``.
With decode-time compression nearly every running request carries such an offset, so the
remap runs on nearly every step and must not cost a Python pass over the batch.

The offsets are a property of the ROW, so they live next to vLLM's block table and move with
it: ``InputBatch.add_request`` sets a row from the request's count, ``clear_row`` (request
removed) zeroes it, ``move_row`` (condense) and ``swap_row`` (reorder) move it, the worker sets
it when it switches a row to its compacted blocks. vLLM's own slot-mapping computation then
receives physical positions once (``physical_positions``): one vectorised check per step when
no row carries an offset, one device gather when some do.
"""

from __future__ import annotations

import time

import numpy as np
import torch


class EvictedRows:
    """Per-row evicted counts of one input batch, plus the per-request source of truth.

    Args:
        max_num_reqs: rows of the block table.

    Attributes:
        by_request: request id -> tokens evicted (cumulative); survives the request leaving and
            re-entering the batch (it is re-added with its count).
        rows: ``[max_num_reqs]`` int32, the count of the request in each row (0: none/empty).
    """

    def __init__(self, max_num_reqs: int) -> None:
        self.by_request: dict[str, int] = {}
        self.rows = np.zeros(max_num_reqs, dtype=np.int32)
        #: Wall time spent remapping positions (the overhead benchmark's per-step timer).
        self.seconds = 0.0

    # --- row events (called from the block-table wrappers) ----------------------------------

    def added(self, req_id: str, row: int) -> None:
        self.rows[row] = self.by_request.get(req_id, 0)

    def cleared(self, row: int) -> None:
        self.rows[row] = 0

    def moved(self, src: int, dst: int) -> None:
        self.rows[dst] = self.rows[src]
        self.rows[src] = 0

    def swapped(self, a: int, b: int) -> None:
        self.rows[[a, b]] = self.rows[[b, a]]

    def set(self, req_id: str, row: int | None, evicted: int) -> None:
        """The request's count after a compaction (``row``: its row now, if in the batch)."""
        self.by_request[req_id] = evicted
        if row is not None:
            self.rows[row] = evicted

    def forget(self, req_id: str) -> None:
        """The request ended or was preempted: its KV is gone (a re-prefill starts at 0)."""
        self.by_request.pop(req_id, None)

    # --- per step ---------------------------------------------------------------------------

    def any(self, num_reqs: int) -> bool:
        return bool(self.rows[:num_reqs].any())

    def physical_positions(self, num_reqs: int, query_start_loc: torch.Tensor,
                           positions: torch.Tensor) -> torch.Tensor:
        """``positions`` minus each token's row offset (``positions`` itself when none).

        Args:
            num_reqs: rows in the step.
            query_start_loc: ``[num_reqs + 1]`` first token of each row (device).
            positions: ``[num_tokens]`` logical positions, rows in order (device).
        """
        start = time.perf_counter()
        if not self.any(num_reqs):
            self.seconds += time.perf_counter() - start
            return positions
        per_row = torch.from_numpy(self.rows[:num_reqs]).to(positions.device,
                                                             non_blocking=True)
        counts = query_start_loc[1:num_reqs + 1] - query_start_loc[:num_reqs]
        per_token = torch.repeat_interleave(per_row, counts,
                                            output_size=positions.shape[0])
        physical = positions - per_token.to(positions.dtype)
        self.seconds += time.perf_counter() - start
        return physical

    def to_physical_lengths(self, num_reqs: int, *lengths: torch.Tensor) -> None:
        """Subtracts each row's offset from per-row length tensors, in place."""
        if not self.any(num_reqs):
            return
        per_row = torch.from_numpy(self.rows[:num_reqs])
        for tensor in lengths:
            tensor[:num_reqs] -= per_row.to(tensor.device, tensor.dtype)
