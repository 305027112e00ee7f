"""The engine path: scheduler-side planning and block freeing, worker-side compaction.

Only ``vllm_patches`` wires these into vLLM; the modules themselves import vLLM lazily.
"""
