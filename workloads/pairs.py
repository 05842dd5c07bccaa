"""How many (query, key) pairs an attention scores (torch-free, for the trace passes that
re-cut attention)."""

from __future__ import annotations


def attention_pairs(q_len: int, kv_len: int, causal: bool, window: int = 0) -> int:
    """(query, key) pairs attention scores: all, the causal triangle (ends aligned), or
    its band of the `window` latest keys up to each query."""
    if not causal:
        return q_len * kv_len
    # query i sees x = kv_len − q_len + i + 1 keys (none while x ≤ 0), at most `window`:
    # the sum of min(x, cap) over the consecutive x from `low` to kv_len
    cap = min(window, kv_len) if window else kv_len
    low = max(kv_len - q_len + 1, 1)
    below = max(0, min(kv_len, cap) - low + 1)  # the x up to cap count x each
    return below * (2 * low + below - 1) // 2 + (kv_len - low + 1 - below) * cap
