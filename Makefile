# vllm-kvcompress: `make demo` (the main job) and `make test` (the tests) work on a fresh machine.
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup models demo test test-fast lint soak clean kvpress-venv bench bench-eval \
	bench-peer bench-merge bench-throughput bench-overhead results

setup:                       ## .venv with vLLM 0.32 (GPU or CPU build) and the plugin, idempotent
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

models: models/smollm2/config.json models/tiny-llama/config.json models/smollm2.qfilters.safetensors

demo: setup models/smollm2/config.json   ## serve SmolLM2 with chunkkv, ask a needle question twice
	$(PY) scripts/demo.py --model models/smollm2 --config configs/chunkkv.yaml

test: setup                  ## everything: unit, engine (in process) and server tests
	$(PY) -m pytest -q

test-fast: setup             ## unit tests only (no engine)
	$(PY) -m pytest -q -m "not engine and not server and not peer"

soak: setup                  ## 1,200 mixed requests against a small-pool `vllm serve`; no 5xx, no leak
	$(PY) scripts/soak.py --out runs/soak

# `make bench`: the measured study behind docs/results.md (about 1 h 45 min on a 2-core CPU).
# Every step writes JSON/CSV/PNG under runs/; `make results` turns them into docs/results.md.
# One prompt set (runs/eval) serves every question: ours (bench-eval: 4 policies x 4 ratios x
# shared/per_head, plus ChunkKV's chunk grid from token 0 with and without sinks as extra
# configurations of the same run) and kvpress on the same prompts (bench-peer, which also runs
# its PyramidKV at our held ratio). Needles at 4k (the targets), multi-turn at 1k (its turn 2
# costs kvpress one 4k prefill per distinct turn-1 answer otherwise), 4 prompts per cell.
# Time, measured here 2026-11-25 with `--limit` (SmolLM2 fp32, OMP_NUM_THREADS=1, the other
# core busy with tests):
#   ours, 17 configs: 1k 0.79 s/request (136 requests), 4k 4.49 s/request (136): a 4k prompt's
#     full prefill ~36 s, then ~2 s per compressed request (per_head costs the same as shared);
#   kvpress, 17 configs: 1k 2.2 s/request (136), 4k ~2.0 s/request (51): a 4k prefill ~23 s,
#     then ~1 s per config (2.5 s for 48-token multi-value answers);
#   these EVAL_ARGS with --limit 2 (no per_head): ours 352 s / 200 requests, kvpress 315 s / 168.
# Estimate for the EVAL_ARGS below: 24 prompts at 4k, 8 multi-turn at 1k, 41 configs ours
# (plus 41 turn-2 requests per multi-turn prompt), 21 kvpress: bench-eval 24 x (36 + 40 x 2 s
# +10% for multi-value) + 8 x 46 s ~ 56 min, bench-peer 16 x 44 + 8 x 76 + 8 x 60 s ~ 30 min,
# bench-throughput ~18 min (unchanged; 18 runs of 24 requests): ~1 h 45 min. The --limit run
# above came in ~20% under this per-request model, so it is a conservative estimate.
# The *_ARGS variables are the study's settings; override them for a bigger one (e.g. EVAL_ARGS="--lengths 1024 2048 4096 8192 --depths 0 0.25 0.5 0.75 1
# --samples-per-cell 4", several hours here).
EVAL_ARGS ?= --lengths 4096 --multiturn-lengths 1024 --depths 0 0.5 --samples-per-cell 4 \
	--tasks niah_single niah_multikey niah_multivalue niah_multiturn \
	--policies streamingllm snapkv chunkkv pyramidkv tova sagekv knorm keydiff \
	expected_attention qfilters --head-select default --ratios 1.0 0.25 0.1
# Extra options of the kvpress run (its prompts are EVAL_ARGS's: both backends share runs/eval).
PEER_ARGS ?=
THROUGHPUT_ARGS ?= --requests 24 --prompt-len 1024 --max-tokens 16 128 --ratios 0.25 0.1
bench: bench-eval bench-peer bench-merge bench-throughput bench-overhead results

bench-eval: setup models/smollm2/config.json models/smollm2.qfilters.safetensors    ## ours: accuracy vs kept ratio, CIs, grid ablation
	rm -rf runs/eval
	$(PY) -m vllm_kvcompress.cli eval --fresh --out runs/eval $(EVAL_ARGS)

bench-peer: setup models/smollm2/config.json models/smollm2.qfilters.safetensors kvpress-venv   ## kvpress on the same prompts (runs/eval)
	$(PY) -m vllm_kvcompress.cli eval --fresh --out runs/eval --backend kvpress $(EVAL_ARGS) \
	  $(PEER_ARGS)

# Merging evicted tokens vs dropping them, ours and kvpress's MergingPress, on the needle prompts
# of EVAL_ARGS (same seed, same prompts), separately from bench-eval to keep that within budget.
MERGE_ARGS ?= --lengths 4096 --depths 0 0.5 --samples-per-cell 4 \
	--tasks niah_single niah_multikey niah_multivalue --policies snapkv knorm \
	--ratios 1.0 0.25 0.1 --head-select default --merge
bench-merge: setup models/smollm2/config.json kvpress-venv   ## merge on/off, ours and kvpress
	rm -rf runs/eval-merge
	$(PY) -m vllm_kvcompress.cli eval --fresh --out runs/eval-merge $(MERGE_ARGS)
	$(PY) -m vllm_kvcompress.cli eval --fresh --out runs/eval-merge --backend kvpress $(MERGE_ARGS)

bench-throughput: setup models/smollm2/config.json   ## memory-bound serving, none vs policies
	$(PY) -m vllm_kvcompress.cli bench throughput --out runs/bench-throughput $(THROUGHPUT_ARGS)

# TTFT share of every method at 4k (fp32; 3 interleaved repetitions) and none vs disabled.
OVERHEAD_ARGS ?= --reps 3 --ab-cycles 1
bench-overhead: setup models/smollm2/config.json models/smollm2.qfilters.safetensors   ## plugin cost
	$(PY) -m vllm_kvcompress.cli bench overhead --out runs/bench-overhead $(OVERHEAD_ARGS)

results: setup                ## docs/results.md (+ docs/img/results/) from runs/
	$(PY) -m vllm_kvcompress.bench.results --runs runs --out docs/results.md

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf .venv .kvpress-venv models runs .pytest_cache .ruff_cache
