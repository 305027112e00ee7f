# vllm-kvcompress: `make demo` (the main job) and `make test` (the tests) work on a fresh machine.
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup models demo test test-fast lint soak clean kvpress-venv

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

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf .venv .kvpress-venv models runs .pytest_cache .ruff_cache
