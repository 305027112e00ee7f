"""The model's rotary position embedding (RoPE), as a scorer may need it.

Cached keys and the engine's window queries are stored *after* RoPE. A scorer that reasons about
queries at other positions (``expected_attention``: future queries) must undo the rotation of the
observed queries and apply the rotation of the positions it predicts. ``Rotary`` carries the
model's own cos/sin table (vLLM's ``cos_sin_cache``, or a Hugging Face model's rotary module for
the reference), so scaled RoPE variants (linear, dynamic, YaRN, Llama-3) are handled by whatever
computed the table, and partial rotary dimensions are left unrotated.

Importable without vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Rotary:
    """RoPE of one model.

    Attributes:
        cos: ``[P, R/2]`` float32, ``cos(position * inv_freq)`` for positions ``0 .. P-1``.
        sin: ``[P, R/2]`` float32, likewise.
        head_dim: ``D``; the first ``R`` dimensions are rotated, the rest pass through.
        neox: rotation pairs ``(i, i + R/2)`` (GPT-NeoX / Llama) when True, ``(2i, 2i + 1)``
            (GPT-J) when False.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    head_dim: int
    neox: bool = True

    def __post_init__(self) -> None:
        if self.cos.shape != self.sin.shape or self.cos.dim() != 2:
            raise ValueError(f"cos and sin must be [positions, rotary_dim / 2], got "
                             f"{tuple(self.cos.shape)} and {tuple(self.sin.shape)}")
        if 2 * self.cos.shape[1] > self.head_dim:
            raise ValueError(f"rotary_dim {2 * self.cos.shape[1]} exceeds head_dim "
                             f"{self.head_dim}")

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    @property
    def rotary_dim(self) -> int:
        return 2 * self.cos.shape[1]

    def _pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.rotary_dim // 2
        idx = torch.arange(half)
        return (idx, idx + half) if self.neox else (2 * idx, 2 * idx + 1)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False
               ) -> torch.Tensor:
        """Applies (or undoes) the rotation of ``positions`` to ``x``.

        Args:
            x: ``[..., n, D]``.
            positions: ``[n]`` int64, each ``< max_positions``.
            inverse: rotate by ``-position`` (post-RoPE -> pre-RoPE).

        Returns:
            ``[..., n, D]`` float32.
        """
        # Index on the table's device, then move only the rows used.
        where = positions.to(self.cos.device)
        cos = self.cos[where].float().to(x.device)  # [n, R/2]
        sin = self.sin[where].float().to(x.device)
        if inverse:
            sin = -sin
        first, second = (p.to(x.device) for p in self._pairs())
        out = x.float().clone()
        a, b = out[..., first], out[..., second]
        out[..., first] = a * cos - b * sin
        out[..., second] = b * cos + a * sin
        return out

    def mean_rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """``[D, D]`` float32, the average over ``positions`` of the rotation matrices (applied
        as ``R @ x``). RoPE's matrix is linear in (cos, sin), so this is the matrix of the mean
        cos and mean sin."""
        where = positions.to(self.cos.device)
        cos = self.cos[where].float().mean(0)
        sin = self.sin[where].float().mean(0)
        first, second = self._pairs()
        matrix = torch.eye(self.head_dim, dtype=torch.float32)
        matrix[first, first] = cos
        matrix[second, second] = cos
        matrix[first, second] = -sin
        matrix[second, first] = sin
        return matrix

    @staticmethod
    def from_vllm(module: Any) -> Rotary:
        """From a vLLM ``RotaryEmbedding`` (``cos_sin_cache`` ``[P, R]``: cos half, sin half)."""
        cache = module.cos_sin_cache.detach().float().cpu()
        half = cache.shape[1] // 2
        return Rotary(cos=cache[:, :half].contiguous(), sin=cache[:, half:].contiguous(),
                      head_dim=int(module.head_size), neox=bool(module.is_neox_style))

    @staticmethod
    def from_hf(model: Any, max_positions: int) -> Rotary:
        """From a Hugging Face Llama-style model's rotary module (NeoX pairs; ``cos``/``sin``
        come back duplicated over both halves and already scaled)."""
        rotary = model.model.rotary_emb
        head_dim = getattr(model.config, "head_dim", None) or \
            model.config.hidden_size // model.config.num_attention_heads
        dummy = torch.zeros(1, 1, head_dim)
        positions = torch.arange(max_positions).unsqueeze(0)
        cos, sin = rotary(dummy, positions)
        half = cos.shape[-1] // 2
        return Rotary(cos=cos[0, :, :half].float().contiguous(),
                      sin=sin[0, :, :half].float().contiguous(), head_dim=head_dim, neox=True)


def find_vllm_rotary(model: Any) -> Rotary | None:
    """The first rotary embedding module of a vLLM model, or ``None`` (no RoPE)."""
    for module in model.modules():
        if hasattr(module, "cos_sin_cache") and hasattr(module, "is_neox_style") and \
                hasattr(module, "head_size"):
            return Rotary.from_vllm(module)
    return None
