# vllm-kvcompress: `make demo` (the main job) and `make test` (the tests) work on a fresh machine.
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup models demo test test-fast lint soak clean kvpress-venv bench bench-eval \
	bench-peer bench-throughput results

setup:                       ## .venv with vLLM 0.32 (GPU or CPU build) and the plugin, idempotent
	@bash scripts/setup.sh

kvpress-venv:                ## .kvpress-venv: NVIDIA kvpress 0.5.5 (transformers < 5.3), the eval's peer backend
	@bash scripts/kvpress_venv.sh

models/smollm2/config.json: | setup
	$(PY) -m vllm_kvcompress.cli prepare-model smollm2 --out models/smollm2

models/tiny-llama/config.json: | setup
	$(PY) -m vllm_kvcompress.cli prepare-model tiny-llama --out models/tiny-llama

models: models/smollm2/config.json models/tiny-llama/config.json

demo: setup models/smollm2/config.json   ## serve SmolLM2 with chunkkv, ask a needle question twice
	$(PY) scripts/demo.py --model models/smollm2 --config configs/chunkkv.yaml

test: setup                  ## everything: unit, engine (in process) and server tests
	$(PY) -m pytest -q

test-fast: setup             ## unit tests only (no engine)
	$(PY) -m pytest -q -m "not engine and not server and not peer"

soak: setup                  ## 1,200 mixed requests against a small-pool `vllm serve`; no 5xx, no leak
	$(PY) scripts/soak.py --out runs/soak

# `make bench`: the measured study behind docs/results.md (1.5-2 hours on a 2-core CPU).
# Every step writes JSON/CSV/PNG under runs/; `make results` turns them into docs/results.md.
# The *_ARGS variables are the quick settings; override them for a bigger study.
EVAL_ARGS ?= --lengths 1024 2048 4096 8192 --depths 0 0.25 0.5 0.75 1
PEER_ARGS ?= --lengths 1024 2048 4096 --depths 0 0.5 1
THROUGHPUT_ARGS ?= --requests 24 --prompt-len 1024 --max-tokens 16 128 --ratios 0.25 0.1
bench: bench-eval bench-peer bench-throughput results

bench-eval: setup models/smollm2/config.json    ## accuracy vs kept ratio, all policies, 1k-8k
	$(PY) -m vllm_kvcompress.cli eval --fresh --out runs/eval $(EVAL_ARGS)

bench-peer: setup models/smollm2/config.json kvpress-venv   ## ours vs kvpress, same prompts
	$(PY) -m vllm_kvcompress.cli eval --fresh --out runs/eval-peer $(PEER_ARGS)
	$(PY) -m vllm_kvcompress.cli eval --fresh --out runs/eval-peer --backend kvpress $(PEER_ARGS)
	$(PY) -m vllm_kvcompress.cli eval --fresh --out runs/eval-peer-sink0 --policies chunkkv \
	  --sink-tokens 0 $(PEER_ARGS)

bench-throughput: setup models/smollm2/config.json   ## memory-bound serving, none vs policies
	$(PY) -m vllm_kvcompress.cli bench throughput --out runs/bench-throughput $(THROUGHPUT_ARGS)

results: setup                ## docs/results.md (+ docs/img/results/) from runs/
	$(PY) -m vllm_kvcompress.bench.results --runs runs --out docs/results.md

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf .venv .kvpress-venv models runs .pytest_cache .ruff_cache
