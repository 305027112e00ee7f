"""Peer backend of the accuracy study: NVIDIA kvpress presses on HF transformers, CPU, greedy.

A package of its own for the ``.kvpress-venv`` (``make kvpress-venv``), which holds kvpress 0.5.5
and a transformers it accepts (< 5.3). It imports only the standard library, torch,
transformers, safetensors, kvpress and tqdm, never the rest of ``vllm_kvcompress``, so it runs
from its folder (``vllm_kvcompress/eval`` on ``PYTHONPATH``)::

    PYTHONPATH=vllm_kvcompress/eval .kvpress-venv/bin/python -m kvpress_peer \\
        --model models/smollm2 --samples jobs.jsonl --configs configs.json --out predictions.jsonl

Parts: ``presses`` (our configuration -> kvpress press, selection mode per press), ``inputs``
(the two input files, checked; errors name the field), ``generation`` (prefill, press replay,
the query-agnostic question prefill, greedy decoding), ``runner`` (the command line and the loop
that writes one record per job).

Inputs:

- ``configs.json``: ``{"configs": [{"policy": ..., "ratio": ..., "key": ...}], "params":
  {"window": 32, "pool_kernel": 5, "chunk_size": 10, "sink_tokens": 4}, "setting":
  "query_aware"}``. ``ratio`` is the fraction of prompt tokens whose KV is KEPT; kvpress's
  ``compression_ratio`` is the fraction removed (1 - ratio). ``key`` (optional) is copied into
  the config's records (``config_key``: the results store's key).
- ``jobs.jsonl``: one sample per line, ``{"id": str, "input_ids": [int, ...], "max_tokens":
  int}``; the ids are the complete chat-templated prompt (context, question, answer prefix),
  used as is. Optional: ``"followup": {"suffix_ids", "stop_ids", "max_tokens"}`` (a multi-turn
  sample: a second turn per config, see below); ``"context_len"`` (required by the
  query-agnostic setting: the leading ids that are the context alone); ``"prompt_key"`` (copied
  into the records); ``"todo": [[config index, turn], ...]`` (default: every config, both turns);
  ``"turn1_output_ids": {"<config index>": [int, ...]}`` (turn-1 answers already recorded, for
  turn-2 jobs whose turn 1 is not in ``todo``).

Settings: ``query_aware`` prefills the whole prompt, question included, with the press active,
so SnapKV's observation window covers the question. ``query_agnostic`` (kvpress's pipeline with
``question=``) prefills the first ``context_len`` ids with the press active, then prefills the
rest (question, template, answer prefix) on the compressed cache without the press, at RoPE
positions from ``context_len`` on. In both, greedy decoding then runs without the press; decoded
tokens get RoPE positions continuing from the ORIGINAL prompt length (kvpress keeps the original
positions baked into the kept keys) while ``cache_position`` follows the compressed cache, as
kvpress's own pipeline does.

Shared prefill (the default; ``--no-shared-prefill`` runs one prefill per config with the press
active): a press does not change the prefill's forward pass (its hook runs after each attention
layer and only replaces that layer's cached keys/values), so each prompt (query-agnostic: each
context) is prefilled ONCE without a press while every attention layer's hook arguments are
recorded; per config, the press's own ``forward_hook`` is then replayed layer by layer on a fresh
cache holding the full keys/values. The compressed caches, hence the outputs, are bit-identical
to the per-config prefill's (tested).

Multi-turn (samples with ``followup``): after a config's turn 1, turn 2's prompt is turn 1's
prompt, turn 1's generated ids (trailing ``stop_ids`` dropped) and ``suffix_ids``, as the vLLM
backend builds it. Query-aware, turn 2 is a fresh run of the same press on the full turn-2 ids
(configs whose turn-1 answers are the same share one turn-2 prefill); query-agnostic, the press
runs on the same context again and everything after it is prefilled without the press.

Token selection (``kvpress_mode`` in every record, ``presses.KVPRESS_MODES``): kvpress's
ScorerPress presses keep a top-k per KV head; ChunkKVPress and TOVAPress one token set per layer;
KVzipPress (``layerwise=True``) one top-k over each layer's (KV head, token) pairs together, by
masking keys (``kept_tokens`` counts the unmasked ones, averaged over the KV heads).

KVzipPress scores by running the model again over the context (its reconstruction passes), so
it is never replayed: its jobs always take the per-config path, a prefill of the prompt (or of
the context) with the press active (``runner.replay_plan``).

Output: one JSON line per job, appended and flushed as soon as it is done (the results store of
``kvcompress eval`` decides what is left to run after an interruption). Bad input prints one
error line and exits with status 2.
"""
