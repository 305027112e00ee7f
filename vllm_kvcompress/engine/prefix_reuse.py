"""Compress once, reuse: compressed prompts kept in vLLM's prefix cache (``reuse_prefix: on``).

A request with ``reuse_prefix: on`` whose prompt is compressed at its end *publishes* the
compressed blocks: each block gets a cache key in vLLM's own map
(``BlockPool.cached_block_hash_to_block``), so vLLM's pool treats them like any cached block
(ref-counted while requests hold them, LRU-evictable once free, the key dropped when the block is
reused). A later request with the same settings whose prompt starts with exactly that context
*hits* it: it starts with the context's logical length computed, the compressed blocks as its
first blocks (a partial last block is copied on write by vLLM), and ``logical - kept`` evicted
tokens, and prefills only its own new tokens, which it keeps whole.

The key of a published context (``context_key``) covers what determines its compressed KV:

* the context's tokens: vLLM's own block-hash chain (``request.block_hashes``, which carries the
  LoRA, the cache salt, prompt embeddings and multimodal inputs) up to the last full hash block,
  plus the tail tokens and their extra keys (``generate_block_hash_extra_keys``);
* the context length (the tail alone would not say where the context ends);
* every compression setting (``CompressionSpec.key()``: policy, ratio/budget, window, sinks,
  head mode, chunk size, merge, the Q-Filters path, ... and ``reuse_prefix`` itself).

Each published block's key is ``KEY_TAG + sha256(context key, publication number, block
index)``: 48 bytes, while vLLM's block hashes are 32 (sha256, sha256_cbor) or 16 (xxh3-128)
bytes, so no key vLLM computes for a prompt can equal one of ours (dictionary keys of different
lengths never compare equal), and ours are only looked up here. A request asking ``none``,
another policy or another ratio computes another key, so it never reads a compressed prefix.

The publication number makes every publication's blocks their own: when a context is published
again (its first publication partly evicted), a hit never mixes blocks of two publications
(whose selections could differ in a near tie).

Importable without vLLM (vLLM's helpers are imported on first use).
"""

from __future__ import annotations

import hashlib
import pickle
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Prefix of every block key this module inserts into vLLM's cache map (16 bytes).
KEY_TAG = b"vllm-kvcompress:"
#: Bytes of a block key before vLLM appends the group id: tag + sha256 digest. No vLLM block
#: hash function returns this many bytes (sha256: 32, xxh3-128: 16).
KEY_BYTES = len(KEY_TAG) + 32
#: Version of the key material (changed when what the key covers changes).
KEY_VERSION = 1


@dataclass(frozen=True)
class PublishedPrefix:
    """One compressed context in the prefix cache.

    Attributes:
        context_len: the context's logical length (tokens of the prompt it covers).
        kept: tokens its blocks hold (per layer and KV head).
        block_keys: the cache-map key of each of its ``cdiv(kept, block_size)`` blocks, in
            order (``BlockHashWithGroupId``: block key + group id).
        anchor: ``context_anchor`` of the context (which lookups try it).
    """

    context_len: int
    kept: int
    block_keys: tuple[bytes, ...]
    anchor: bytes = b""


def context_anchor(request: Any, context_len: int, hash_block_size: int) -> bytes:
    """What a lookup narrows the published contexts by: vLLM's hash of the first hash block
    (covering the cache salt and LoRA too), or ``b""`` for a context shorter than one block.
    Only contexts starting like the request are tried, so a lookup's cost does not grow with
    what unrelated requests published."""
    return bytes(request.block_hashes[0]) if context_len >= hash_block_size else b""


def context_key(request: Any, context_len: int, settings_key: str, hash_block_size: int
                ) -> bytes:
    """The key of ``request``'s first ``context_len`` tokens compressed under one setting.

    Args:
        request: a vLLM ``Request`` whose token ids start with the context (its
            ``block_hashes`` cover at least ``context_len // hash_block_size`` blocks).
        context_len: tokens of the context.
        settings_key: ``CompressionSpec.key()`` of the compression settings.
        hash_block_size: tokens per vLLM block hash (``BlockPool.hash_block_size``).

    Returns:
        A 32-byte sha256 digest.
    """
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys

    full = context_len // hash_block_size
    parent = bytes(request.block_hashes[full - 1]) if full else b""
    start = full * hash_block_size
    tail = tuple(request.all_token_ids[start:context_len])
    extra = generate_block_hash_extra_keys(request, start, context_len, 0)[0] if tail else None
    material = (KEY_VERSION, context_len, parent, tail, extra, settings_key)
    return hashlib.sha256(pickle.dumps(material, protocol=5)).digest()


class CompressedPrefixes:
    """The compressed contexts one engine core published, as an index over vLLM's cache map.

    vLLM's pool owns the blocks and their keys (eviction drops a key when its block is handed
    out again); this index only remembers, per context key, which block keys a hit must find.
    An entry one of whose blocks is gone is dropped when a lookup or a publication notices.

    Args:
        block_pool: vLLM's ``BlockPool`` (prefix caching on).
        block_size: tokens per block.
        group_id: the KV-cache group of the full-attention manager.
    """

    def __init__(self, block_pool: Any, block_size: int, group_id: int) -> None:
        from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

        self.block_pool = block_pool
        self.block_size = block_size
        self.group_id = group_id
        self.hash_block_size = block_pool.hash_block_size
        self._with_group = make_block_hash_with_group_id
        #: context key -> its live publication.
        self.entries: dict[bytes, PublishedPrefix] = {}
        #: anchor -> context length -> entries (the lengths a lookup tries).
        self._lengths: dict[bytes, Counter[int]] = {}
        self._publications = 0

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, request: Any, settings_key: str, limit: int
             ) -> tuple[PublishedPrefix, list[Any]] | None:
        """The longest published context that ``request``'s tokens start with, under these
        settings, no longer than ``limit`` tokens, and its blocks (all still cached).

        Cost: one key (a sha256 of at most one block of tokens and the settings) per distinct
        length up to ``limit`` among the published contexts that start like the request (the
        same first hash block, or shorter than one block), for requests that opted in only.
        """
        anchors = [b""]
        if request.block_hashes and limit >= self.hash_block_size:
            anchors.append(bytes(request.block_hashes[0]))
        lengths = {n for anchor in anchors for n in self._lengths.get(anchor, ()) if n <= limit}
        for length in sorted(lengths, reverse=True):
            key = context_key(request, length, settings_key, self.hash_block_size)
            prefix = self.entries.get(key)
            if prefix is None:
                continue
            blocks = self._cached_blocks(prefix)
            if blocks is not None:
                return prefix, blocks
            self._drop(key)
        return None

    def publish(self, key: bytes, anchor: bytes, context_len: int, kept: int,
                blocks: Sequence[Any]) -> bool:
        """Puts a request's compressed blocks in the prefix cache under ``key``.

        Args:
            key: ``context_key`` of the request's prompt under its settings.
            anchor: ``context_anchor`` of the prompt.
            context_len: the prompt's length.
            kept: tokens its blocks hold.
            blocks: its ``cdiv(kept, block_size)`` compacted blocks (written: the step that
                compacted them has run), none of them cached yet.

        Returns:
            Whether they were published (``False``: the context is already there, live).
        """
        known = self.entries.get(key)
        if known is not None and self._cached_blocks(known) is not None:
            return False
        self._sweep()
        self._publications += 1
        serial = self._publications.to_bytes(8, "big")
        keys = []
        for index, block in enumerate(blocks):
            digest = hashlib.sha256(key + serial + index.to_bytes(4, "big")).digest()
            block_key = self._with_group(KEY_TAG + digest, self.group_id)
            self.block_pool._insert_block_hash(block_key, block, None)
            keys.append(block_key)
        if key in self.entries:
            self._drop(key)
        self.entries[key] = PublishedPrefix(context_len, kept, tuple(keys), anchor)
        self._lengths.setdefault(anchor, Counter())[context_len] += 1
        return True

    def _cached_blocks(self, prefix: PublishedPrefix) -> list[Any] | None:
        """The publication's blocks, or ``None`` when vLLM evicted any of them."""
        cache = self.block_pool.cached_block_hash_to_block
        blocks = []
        for block_key in prefix.block_keys:
            block = cache.get_one_block(block_key)
            if block is None:
                return None
            blocks.append(block)
        return blocks

    def _drop(self, key: bytes) -> None:
        prefix = self.entries.pop(key)
        lengths = self._lengths[prefix.anchor]
        lengths[prefix.context_len] -= 1
        if not lengths[prefix.context_len]:
            del lengths[prefix.context_len]
            if not lengths:
                del self._lengths[prefix.anchor]

    def _sweep(self) -> None:
        """Drops entries vLLM evicted (before each publication: the index stays within the
        pool's size)."""
        for key in [k for k, p in self.entries.items() if self._cached_blocks(p) is None]:
            self._drop(key)
