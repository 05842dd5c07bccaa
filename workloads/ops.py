"""Custom ops (torch.library) that the trace must see whole, not decomposed.

- `mmsim::ternary_matmul`: int8 activations × 2-bit packed ternary weights → int32.
- `mmsim::rms_norm`: RMSNorm with a per-channel weight (the FPGA has an RMS unit).
- `mmsim::attention`: scaled dot-product attention with grouped KV heads, optionally causal
  and within a sliding window; the mapping decides per machine whether it runs fused
  (FlashAttention-2) or unfused.
- `mmsim::hgrn_scan`: the MLGRU recurrence h_t = f_t ⊙ h_{t−1} + c_t over a sequence.

Each has an exact reference implementation on real tensors and a fake (meta) one for traces.
RMSNorm and attention are differentiable through backward ops of their own
(`mmsim::rms_norm_backward`, `mmsim::attention_backward`: one fused kernel each, as
FlashAttention-2's backward is), so a training trace sees them whole too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: 2-bit codes of the ternary values: 0 → 0b00, +1 → 0b01, −1 → 0b10.
WEIGHTS_PER_BYTE = 4


def pack_ternary(weights: torch.Tensor) -> torch.Tensor:
    """Pack an (N, K) tensor of {−1, 0, 1} into (N, ⌈K/4⌉) uint8, 4 weights a byte, LSB first."""
    n, k = weights.shape
    codes = torch.where(weights < 0, 2, weights.to(torch.int64)).to(torch.uint8)
    padded = torch.zeros(n, -(-k // WEIGHTS_PER_BYTE) * WEIGHTS_PER_BYTE, dtype=torch.uint8,
                         device=weights.device)
    padded[:, :k] = codes
    groups = padded.view(n, -1, WEIGHTS_PER_BYTE)
    packed = groups[..., 0] | groups[..., 1] << 2 | groups[..., 2] << 4 | groups[..., 3] << 6
    return packed.contiguous()


def unpack_ternary(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_ternary`: (N, ⌈K/4⌉) uint8 → (N, K) int8 in {−1, 0, 1}."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    values = torch.where(codes == 2, -1, codes.to(torch.int64)).to(torch.int8)
    return values.reshape(packed.shape[0], -1)[:, :k]


@torch.library.custom_op("mmsim::ternary_matmul", mutates_args=())
def ternary_matmul(x: torch.Tensor, packed: torch.Tensor, k: int) -> torch.Tensor:
    """int8 (…, K) × ternary (N, K) packed → int32 (…, N): y = x · Wᵀ."""
    weights = unpack_ternary(packed, k).to(torch.int64)
    return (x.to(torch.int64) @ weights.T).to(torch.int32)


@ternary_matmul.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, k: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]), dtype=torch.int32)


@torch.library.custom_op("mmsim::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dimension, computed in fp32."""
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("mmsim::rms_norm_backward", mutates_args=())
def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of `rms_norm` for the output gradient `grad`, in fp32."""
    xf, g = x.float(), grad.float() * weight.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    dx = r * g - xf * r.pow(3) * (g * xf).mean(-1, keepdim=True)
    dw = (grad.float() * xf * r).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


@rms_norm_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
      ) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` in aten ops."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _rms_norm_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor
                    ) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps  # type: ignore[attr-defined]


def _rms_norm_grad(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, None]:
    x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
    dx, dw = rms_norm_backward(grad, x, weight, ctx.eps)  # type: ignore[attr-defined]
    return dx, dw, None


rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        window: int = 0) -> torch.Tensor:
    """`attention` in aten ops."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    mask = _mask(q.shape[2], k.shape[2], causal, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).contiguous()


def _mask(sq: int, sk: int, causal: bool, window: int, device: torch.device
          ) -> torch.Tensor | None:
    """Which keys each query sees (None: all)."""
    if not causal:
        return None
    ones = torch.ones(sq, sk, dtype=torch.bool, device=device)
    mask = ones.tril(sk - sq)
    return mask & ones.triu(sk - sq - window + 1) if window else mask


@torch.library.custom_op("mmsim::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              window: int = 0) -> torch.Tensor:
    """softmax(q kᵀ/√d) v with q (B, H, Sq, D), k/v (B, Hkv, Sk, D); causal aligns ends;
    window > 0 (causal only) lets each query see only the `window` latest keys up to its
    own position."""
    return attention_reference(q, k, v, causal, window)


@attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
      window: int = 0) -> torch.Tensor:
    # contiguous like the real kernel's output, so real and traced runs lay out alike
    return q.new_empty(q.shape)



@torch.library.custom_op("mmsim::attention_backward", mutates_args=())
def attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, causal: bool, window: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attention` for the output gradient `grad`, from the probabilities
    recomputed (FlashAttention-2's backward reads `out` for rowsum(dO ∘ O); so does this)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    groups, scale = heads // kv_heads, q.shape[-1] ** -0.5
    kf, vf = (t.repeat_interleave(groups, dim=1).double() for t in (k, v))
    qd, gd = q.double(), grad.double()
    scores = qd @ kf.transpose(-1, -2) * scale
    mask = _mask(q.shape[2], k.shape[2], causal, window, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = scores.softmax(-1)
    dp = gd @ vf.transpose(-1, -2)
    ds = p * (dp - (gd * out.double()).sum(-1, keepdim=True))
    dq = ds @ kf * scale
    dk = (ds.transpose(-1, -2) @ qd * scale).unflatten(1, (kv_heads, groups)).sum(2)
    dv = (p.transpose(-1, -2) @ gd).unflatten(1, (kv_heads, groups)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@attention_backward.register_fake
def _(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
      causal: bool, window: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple,
                     output: torch.Tensor) -> None:
    q, k, v, causal, *window = inputs
    ctx.save_for_backward(q, k, v, output)
    ctx.causal, ctx.window = causal, (window[0] if window else 0)  # type: ignore[attr-defined]


def _attention_grad(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
    q, k, v, out = ctx.saved_tensors  # type: ignore[attr-defined]
    dq, dk, dv = attention_backward(grad, q, k, v, out, ctx.causal,  # type: ignore[attr-defined]
                                    ctx.window)  # type: ignore[attr-defined]
    return dq, dk, dv, None, None


attention.register_autograd(_attention_grad, setup_context=_attention_setup)


@torch.library.custom_op("mmsim::hgrn_scan", mutates_args=())
def hgrn_scan(f: torch.Tensor, c: torch.Tensor, h0: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = f_t ⊙ h_{t−1} + c_t over time (dim 1) in fp32; returns (h for every t, h_T)."""
    h = h0.float()
    outputs = []
    for t in range(f.shape[1]):
        h = f[:, t].float() * h + c[:, t].float()
        outputs.append(h)
    return torch.stack(outputs, dim=1).to(f.dtype), h


@hgrn_scan.register_fake
def _(f: torch.Tensor, c: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(f), torch.empty_like(h0, dtype=torch.float32)
