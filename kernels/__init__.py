"""Triton kernels for scoring, chunk selection and compaction (shipped as vllm_kvcompress.kernels).

The torch references that every kernel must match live with the policies
(``vllm_kvcompress.policies.window_scoring``, ``select``, ``chunk_select``) and are the CPU path.
The Triton kernels themselves are tracked by the kernels issue and are not in this release.
"""
