"""vllm-kvcompress: real KV-cache compression for vLLM (ChunkKV, SnapKV, StreamingLLM, PyramidKV).

Importing this package has no side effects on vLLM; the entry point ``plugin.register`` does the
patching. The policy library (``vllm_kvcompress.policies``) and the settings model
(``vllm_kvcompress.config``) import without vLLM.
"""

__version__ = "0.1.0"
