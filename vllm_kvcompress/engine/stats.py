"""Compression counters, from the engine core to ``/metrics``.

The scheduler (engine-core process) counts; the OpenAI server (another process) serves
``/metrics``. vLLM's own stats channel drops unknown fields and prometheus multiprocess mode must
be chosen before vLLM imports prometheus_client, so the engine core writes its counters to a small
JSON file (atomic rename, once per compressed request) and a custom collector in the API server
reads it at scrape time. Names live under ``vllm_kvcompress:``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Upper bounds of the kept-ratio histogram buckets (kept / prompt tokens).
RATIO_BUCKETS = (0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0)


@dataclass
class CompressionStats:
    """Cumulative counters of one engine core.

    Attributes:
        requests_compressed: requests whose KV was compacted.
        tokens_kept: prompt tokens kept, summed over compressed requests.
        tokens_evicted: prompt tokens evicted.
        blocks_freed: blocks returned to the pool (original blocks minus compacted blocks).
        skipped_no_memory: compressions skipped because no block could be spared and the
            request's blocks were shared.
        skipped_resumed: re-prefills after preemption, which keep their full KV.
        not_compressed_short: requests with a policy whose prompt was too short to compress.
        failed: requests finished with an error because their compaction raised.
        decode_compactions: compactions on decode steps and at the end of re-prefills
            (decode-time compression), counted per compaction, not per request.
        decode_tokens_evicted: tokens evicted by those compactions.
        decode_blocks_freed: blocks those compactions returned to the pool.
        resumed_recompressed: re-prefills after preemption compacted back to their
            ``decode_budget`` (included in ``decode_compactions``).
        prefill_compactions: compactions to ``prefill_budget`` (after a prefill chunk, or at
            the prompt's end), counted per compaction.
        prefill_tokens_evicted: tokens evicted by those compactions.
        prefill_blocks_freed: blocks those compactions returned to the pool.
        query_ring_bytes: memory the workers hold now for decode-compressed requests' last
            ``window`` queries (a gauge, all ranks together).
        query_ring_pool_bytes: memory the workers' query-ring pools hold (allocated, all
            ranks together; pools grow by doubling and go when their last request does).
        prefixes_published: compressed prompts put in the prefix cache (``reuse_prefix``).
        prefix_reuse_hits: requests that started on a published compressed prefix.
        prefix_reuse_tokens: logical context tokens those requests did not prefill.
        ratio_bucket_counts: histogram counts per ``RATIO_BUCKETS`` bound (not cumulative).
        ratio_sum: sum of kept ratios (for the histogram's ``_sum``).
        path: where ``flush`` writes; ``None`` keeps the counters in memory only.
    """

    requests_compressed: int = 0
    tokens_kept: int = 0
    tokens_evicted: int = 0
    blocks_freed: int = 0
    skipped_no_memory: int = 0
    skipped_resumed: int = 0
    not_compressed_short: int = 0
    failed: int = 0
    decode_compactions: int = 0
    decode_tokens_evicted: int = 0
    decode_blocks_freed: int = 0
    resumed_recompressed: int = 0
    prefill_compactions: int = 0
    prefill_tokens_evicted: int = 0
    prefill_blocks_freed: int = 0
    query_ring_bytes: int = 0
    query_ring_pool_bytes: int = 0
    prefixes_published: int = 0
    prefix_reuse_hits: int = 0
    prefix_reuse_tokens: int = 0
    ratio_bucket_counts: list[int] = field(default_factory=lambda: [0] * len(RATIO_BUCKETS))
    ratio_sum: float = 0.0
    path: str | None = None

    def record(self, prompt_len: int, kept: int, blocks_freed: int) -> None:
        """Counts one compressed request and flushes."""
        self.requests_compressed += 1
        self.tokens_kept += kept
        self.tokens_evicted += prompt_len - kept
        self.blocks_freed += blocks_freed
        ratio = kept / prompt_len
        self.ratio_sum += ratio
        bucket = next(i for i, bound in enumerate(RATIO_BUCKETS) if ratio <= bound)
        self.ratio_bucket_counts[bucket] += 1
        self.flush()

    def record_decode(self, source_len: int, kept: int, blocks_freed: int, resumed: bool
                      ) -> None:
        """Counts one decode-time compaction (``resumed``: at the end of a re-prefill)."""
        self.decode_compactions += 1
        self.decode_tokens_evicted += source_len - kept
        self.decode_blocks_freed += blocks_freed
        self.resumed_recompressed += int(resumed)
        self.flush()

    def record_prefill(self, source_len: int, kept: int, blocks_freed: int) -> None:
        """Counts one compaction to ``prefill_budget`` (a prefill chunk or the prompt's end)."""
        self.prefill_compactions += 1
        self.prefill_tokens_evicted += source_len - kept
        self.prefill_blocks_freed += blocks_freed
        self.flush()

    def record_published(self) -> None:
        """Counts one compressed prompt published to the prefix cache and flushes."""
        self.prefixes_published += 1
        self.flush()

    def record_reuse(self, context_len: int) -> None:
        """Counts one request started on a published compressed prefix of ``context_len``
        logical tokens and flushes."""
        self.prefix_reuse_hits += 1
        self.prefix_reuse_tokens += context_len
        self.flush()

    def record_failed(self, count: int) -> None:
        """Counts requests failed by a compaction error and flushes."""
        self.failed += count
        self.flush()

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return data

    def flush(self) -> None:
        """Writes the counters atomically (no-op without a path)."""
        if self.path is None:
            return
        target = Path(self.path)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".kvcompress-stats-")
        with os.fdopen(fd, "w") as out:
            json.dump(self.as_dict(), out)
        os.replace(tmp, target)


def read_stats(path: str) -> CompressionStats:
    """The last counters flushed to ``path`` (zeros if none yet)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return CompressionStats()
    return CompressionStats(**data)


class StatsCollector:
    """A prometheus_client collector that exposes the engine core's counters at scrape time."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        stats = read_stats(self.path)
        for name, value, doc in (
            ("requests_compressed", stats.requests_compressed, "Requests whose KV was compacted"),
            ("tokens_kept", stats.tokens_kept, "Prompt tokens kept after compression"),
            ("tokens_evicted", stats.tokens_evicted, "Prompt tokens evicted from the KV cache"),
            ("blocks_freed", stats.blocks_freed, "KV blocks returned to the pool"),
            ("decode_compactions", stats.decode_compactions,
             "Decode-time compactions (a request crossed decode_budget + decode_interval, or "
             "its re-prefill after preemption ended)"),
            ("decode_tokens_evicted", stats.decode_tokens_evicted,
             "Tokens evicted by decode-time compactions"),
            ("decode_blocks_freed", stats.decode_blocks_freed,
             "KV blocks returned to the pool by decode-time compactions"),
            ("resumed_recompressed", stats.resumed_recompressed,
             "Re-prefills after preemption compacted back to their decode_budget"),
            ("prefill_compactions", stats.prefill_compactions,
             "Compactions to prefill_budget while prompts were prefilled"),
            ("prefill_tokens_evicted", stats.prefill_tokens_evicted,
             "Tokens evicted by compactions to prefill_budget"),
            ("prefill_blocks_freed", stats.prefill_blocks_freed,
             "KV blocks returned to the pool by compactions to prefill_budget"),
            ("prefixes_published", stats.prefixes_published,
             "Compressed prompts put in the prefix cache (reuse_prefix)"),
            ("prefix_reuse_hits", stats.prefix_reuse_hits,
             "Requests that started on a published compressed prefix"),
            ("prefix_reuse_tokens", stats.prefix_reuse_tokens,
             "Context tokens not prefilled thanks to published compressed prefixes"),
        ):
            yield CounterMetricFamily(f"vllm_kvcompress:{name}", doc, value=value)
        skipped = CounterMetricFamily("vllm_kvcompress:requests_not_compressed",
                                      "Requests with a policy that kept their full KV",
                                      labels=["reason"])
        skipped.add_metric(["no_memory"], stats.skipped_no_memory)
        skipped.add_metric(["resumed_after_preemption"], stats.skipped_resumed)
        skipped.add_metric(["prompt_too_short"], stats.not_compressed_short)
        yield skipped
        yield GaugeMetricFamily("vllm_kvcompress:query_ring_bytes",
                                "Memory held for decode-compressed requests' window queries",
                                value=stats.query_ring_bytes)
        yield GaugeMetricFamily("vllm_kvcompress:query_ring_pool_bytes",
                                "Memory the workers' query-ring pools hold (allocated)",
                                value=stats.query_ring_pool_bytes)
        yield CounterMetricFamily("vllm_kvcompress:requests_failed",
                                  "Requests finished with an error because compaction raised",
                                  value=stats.failed)
        cumulative, buckets = 0, []
        for bound, count in zip(RATIO_BUCKETS, stats.ratio_bucket_counts, strict=True):
            cumulative += count
            buckets.append((str(bound), cumulative))
        buckets.append(("+Inf", cumulative))
        yield HistogramMetricFamily("vllm_kvcompress:kept_ratio",
                                    "Kept fraction of prompt tokens per compressed request",
                                    buckets=buckets, sum_value=stats.ratio_sum)
