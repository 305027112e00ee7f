"""Model-shaped configurations shared by the benchmarks (one registry, from the models' configs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of a model.

    Attributes:
        name: display name.
        num_layers: attention layers.
        num_q_heads: query heads.
        num_kv_heads: KV heads (GQA groups).
        head_dim: per-head dimension.
    """

    name: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


MODEL_SHAPES = {
    "llama-3.1-8b": ModelShape("Llama-3.1-8B", 32, 32, 8, 128),
    "qwen2.5-7b": ModelShape("Qwen2.5-7B", 28, 28, 4, 128),
    "smollm2-135m": ModelShape("SmolLM2-135M", 30, 9, 3, 64),
}
