"""Ternary weights packed 2 bits each, and a matrix product made of additions only.

Codes, 4 to a byte, least significant first: 0b00 → 0, 0b01 → +1, 0b10 → −1 (the layout
`workloads.ops.pack_ternary` writes). The product accumulates int8 activations into
int32 by adding where a weight is +1 and subtracting where it is −1: no weight is ever
multiplied, as on the FPGA's adder trees.
"""

from __future__ import annotations

import numpy as np

WEIGHTS_PER_BYTE = 4
SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)


def pack(weights: np.ndarray) -> np.ndarray:
    """(N, K) int in {−1, 0, 1} → (N, ⌈K/4⌉) uint8."""
    n, k = weights.shape
    if weights.size and (weights.min() < -1 or weights.max() > 1):
        raise ValueError("ternary weights must be in {-1, 0, 1}")
    codes = np.where(weights < 0, 2, weights).astype(np.uint8)
    padded = np.zeros((n, -(-k // WEIGHTS_PER_BYTE) * WEIGHTS_PER_BYTE), dtype=np.uint8)
    padded[:, :k] = codes
    groups = padded.reshape(n, -1, WEIGHTS_PER_BYTE)
    return np.bitwise_or.reduce(np.left_shift(groups, SHIFTS), axis=-1).astype(np.uint8)


def signs(packed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks (N, K) of the +1 and the −1 weights, read from the 2-bit codes."""
    codes = np.bitwise_and(np.right_shift(packed[..., None], SHIFTS), 3)
    codes = codes.reshape(packed.shape[0], -1)[:, :k]
    return np.equal(codes, 1), np.equal(codes, 2)


def matmul(x: np.ndarray, packed: np.ndarray, k: int) -> np.ndarray:
    """int8 x (M, K) · ternaryᵀ (K, N) → int32 (M, N), by additions and subtractions."""
    plus, minus = signs(packed, k)
    wide = x.astype(np.int32)[:, None, :]  # (M, 1, K); astype keeps array subclasses
    zero = np.zeros((), dtype=np.int32)
    added = np.add.reduce(np.where(plus[None], wide, zero), axis=-1, dtype=np.int32)
    taken = np.add.reduce(np.where(minus[None], wide, zero), axis=-1, dtype=np.int32)
    return np.subtract(added, taken, dtype=np.int32)


def bitlinear(x: np.ndarray, norm_weight: np.ndarray, packed: np.ndarray, k: int,
              weight_scale: float, eps: float) -> np.ndarray:
    """The whole BitLinear: RMSNorm → int8 absmax → ternary product → dequantise (fp32)."""
    from simulator.kernels.vector import absmax_quantise, rms_norm

    normed = rms_norm(x.reshape(-1, k), norm_weight, eps)
    q, scale = absmax_quantise(normed)
    return matmul(q, packed, k).astype(np.float32) / scale / np.float32(weight_scale)
