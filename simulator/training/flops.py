"""The FLOP convention of training throughput, defined once.

Model FLOPs of one sequence of s tokens: 6·N·s + 12·L·h·s² (N parameters, embeddings
included and a tied matrix once, L layers, hidden size h). The first term is the forward
(2·N·s) and backward (4·N·s: activation and weight gradients) of every weight; with a
frozen base (LoRA) only the N_t trainable weights have weight gradients, and the term is
4·N·s + 2·N_t·s (6·N·s again when every weight trains). The second the attention scores and their
product with V, forward and backward, *not* halved for a causal mask. This is the formula
FlashAttention-2 states for its end-to-end GPT results (arXiv 2307.08691 §4.3, following
Megatron-LM's), so MFU here is comparable with its Table 1. MFU is the model FLOPs per
second per device over the device's peak matrix rate in the compute dtype; HFU counts the
FLOPs the trace executes instead (recomputation included, attention backward at 2.5× its
forward as FlashAttention-2 counts it, a causal mask halving the attention work).

An encoder (ViT, CLIP: two towers of different widths, image patches and text prompts)
has no single (N, L, h, s): its model FLOPs are the matrix FLOPs its forward and backward
execute as traced (`traced_flops`: recomputation excluded, so MFU ≤ HFU as for LMs).
"""

from __future__ import annotations

from collections.abc import Sequence

from simulator.hardware.select import peak_flops
from simulator.workload.trace import MATRIX_KINDS, Op

__all__ = ["ENCODER_FORMULA", "FORMULA", "model_flops", "peak_flops", "traced_flops"]

ENCODER_FORMULA = ("model FLOPs = the traced forward and backward matrix FLOPs (GEMMs and "
                   "attention, attention backward at 2.5× its forward; recomputation not "
                   "counted) [an encoder: 6·N·s does not hold for its towers]; MFU = model "
                   "FLOPs / step time / devices / peak matrix FLOP/s")
FORMULA = ("model FLOPs = sequences × (6·N·s + 12·L·h·s²) [FlashAttention-2 §4.3; a "
           "frozen base: 4·N·s + 2·N_trainable·s]; MFU = model FLOPs / step time / devices "
           "/ peak matrix FLOP/s")


def model_flops(params: int, layers: int, hidden: int, seq_len: int, sequences: int,
                trainable: int | None = None) -> float:
    """Model FLOPs of `sequences` sequences of `seq_len` tokens (see the module notes);
    `trainable` (default all `params`) weights get weight gradients."""
    trained = params if trainable is None else trainable
    return float(sequences * ((4 * params + 2 * trained) * seq_len
                              + 12 * layers * hidden * seq_len ** 2))


def traced_flops(ops: Sequence[Op], micro_batches: int) -> float:
    """An encoder's model FLOPs: its forward and backward matrix ops over `micro_batches`
    micro-batches (the recomputed forward is not model work)."""
    return float(micro_batches * sum(op.ops for op in ops if op.kind in MATRIX_KINDS
                                     and op.stage in ("fwd", "bwd_act", "bwd_weight")))
