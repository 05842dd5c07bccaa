"""Row-wise and recurrent primitives in fp32: quantisation, RMSNorm, SiLU, the MLGRU scan."""

from __future__ import annotations

import numpy as np


def absmax_quantise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row int8 absmax quantisation: (q, scale) with x ≈ q / scale, scale = 127/max|x|."""
    scale = 127.0 / np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
    return np.clip(np.round(x * scale), -128, 127).astype(np.int8), scale.astype(np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x²) + eps) · weight over the last axis, in fp32."""
    xf = x.astype(np.float32)
    return xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + eps) * weight


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def mlgru_scan(f: np.ndarray, c: np.ndarray, h0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h_t = f_t ⊙ h_{t−1} + c_t over axis 1, in fp32: (h for every t, h_T)."""
    h = h0.astype(np.float32)
    out = np.empty(f.shape, dtype=np.float32)
    for t in range(f.shape[1]):
        h = f[:, t].astype(np.float32) * h + c[:, t].astype(np.float32)
        out[:, t] = h
    return out, h


def flash_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal_offset: int | None,
                    kv_tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query block against keys/values in tiles, with the online softmax of FA-2.

    q (Br, D), k/v (Sk, D); row i of q sees keys up to i + causal_offset when causal.
    Returns the normalised output and each row's running max m and sum l, so blocks over
    split keys can be merged (`merge`).
    """
    scale = 1.0 / np.sqrt(q.shape[-1])
    rows = q.shape[0]
    m = np.full(rows, -np.inf, dtype=np.float32)
    l = np.zeros(rows, dtype=np.float32)  # noqa: E741 - the paper's name
    acc = np.zeros((rows, v.shape[-1]), dtype=np.float32)
    for start in range(0, k.shape[0], kv_tile):
        s = (q @ k[start:start + kv_tile].T) * scale
        if causal_offset is not None:
            keys = np.arange(start, start + s.shape[1])
            s = np.where(keys[None, :] <= np.arange(rows)[:, None] + causal_offset, s, -np.inf)
        m_new = np.maximum(m, s.max(axis=1))
        live = np.isfinite(m_new)
        p = np.where(live[:, None], np.exp(s - np.where(live, m_new, 0)[:, None]), 0.0)
        correction = np.where(np.isfinite(m), np.exp(m - np.where(live, m_new, 0)), 0.0)
        l = l * correction + p.sum(axis=1)  # noqa: E741
        acc = acc * correction[:, None] + p @ v[start:start + kv_tile]
        m = m_new
    return acc / np.maximum(l, 1e-30)[:, None], m, l


def merge(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Combine (output, m, l) of one query block over disjoint key ranges (flash-decoding)."""
    top = np.max(np.stack([m for _, m, _ in pieces]), axis=0)
    weights = [np.where(np.isfinite(m), np.exp(m - top), 0.0) * mass for _, m, mass in pieces]
    total = sum(w[:, None] * out for (out, _, _), w in zip(pieces, weights, strict=True))
    return total / np.maximum(sum(weights), 1e-30)[:, None]
