"""``python -m vllm_kvcompress.bench.results``: see ``page``."""

from .page import main

main()
