"""Capture a Trace at the PyTorch dispatcher (the way torch.utils.flop_counter does).

The model runs on the `meta` device under a TorchDispatchMode: every aten/custom op is
seen with its shapes, dtypes and the module that called it, at no memory cost. Views
are followed to their base tensor so that weight, state and activation bytes, producer
dependencies and activation liveness are all known.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from simulator.errors import UserError
from simulator.workload.trace import Op, OpKind, Phase, Trace
from workloads.build import prepare
from workloads.models import AnyModel
from workloads.pairs import attention_pairs

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
           torch.int8: "int8", torch.uint8: "int8", torch.int32: "int32", torch.int64: "int32",
           torch.bool: "int8"}
_FACTORIES = {"empty", "zeros", "ones", "full", "scalar_tensor", "lift_fresh", "lift_fresh_copy",
              "empty_like", "zeros_like", "ones_like", "full_like", "empty_strided", "detach",
              "alias", "new_empty", "new_zeros"}
_ALIASING = {"_unsafe_view", "_reshape_alias"}
_ACTIVATION = {"sigmoid", "silu", "exp", "tanh", "gelu", "rsqrt", "sqrt", "log", "cos", "sin",
               "erf", "reciprocal", "relu", "relu_", "gelu_backward", "silu_backward",
               "sigmoid_backward", "tanh_backward", "threshold_backward"}
_REDUCTION = {"sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "argmax",
              "topk", "max_pool2d_with_indices", "avg_pool2d", "_adaptive_avg_pool2d"}
#: aten's own normalisations (LayerNorm, BatchNorm at inference, GroupNorm, RMSNorm).
_NORM = {"native_layer_norm", "native_batch_norm", "_native_batch_norm_legit_no_training",
         "native_group_norm", "_fused_rms_norm", "rms_norm", "native_layer_norm_backward",
         "native_group_norm_backward", "native_batch_norm_backward", "_fused_rms_norm_backward"}
#: In-place writes of some entries (a KV cache's new entries, an expert's tokens added into
#: the MoE output): they move and work on the new values, not the whole tensor written into.
_INDEXED_WRITES = {"index_copy_", "index_put_", "index_add_", "scatter_", "scatter_add_"}
_SOFTMAX = {"_softmax", "_safe_softmax", "softmax", "_log_softmax", "_softmax_backward_data",
            "_log_softmax_backward_data"}
_MEMORY = {"copy_", "clone", "cat", "stack", "index_copy", "index_copy_"}
_CUSTOM: dict[str, OpKind] = {"ternary_matmul": "ternary_matmul", "rms_norm": "norm",
                              "attention": "attention", "hgrn_scan": "recurrence",
                              "rms_norm_backward": "norm", "attention_backward": "attention"}
#: FlashAttention-2's backward runs 5 matmuls where the forward runs 2 [FA-2 §3.1.2]: its
#: FLOPs are 2.5 × the forward's (the convention of its benchmark script).
ATTENTION_BACKWARD_FLOPS = 2.5
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "convolution_backward"}
#: A block of a model: the shortest module path that ends in an index (`layers.3`,
#: `model.layers.3`, `transformer.h.3`, `vit.encoder.layer.3`, `layer2.1`).
_LAYER = re.compile(r"^((?:[^.]+\.)*?\d+)(?:\.|$)")


def is_alias(func: Any) -> bool:
    """A view or re-labelling of its input: no work, no op of its own."""
    return bool(func.is_view) or func.overloadpacket.__name__ in _ALIASING


def is_recorded(func: Any, ins: list[torch.Tensor]) -> bool:
    """Whether an op becomes an Op of the trace (the rule every replay must share)."""
    return not is_alias(func) and func.overloadpacket.__name__ not in _FACTORIES and bool(ins)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _layer(module: str) -> str:
    """The block a module belongs to; outside the blocks, the module itself (its top-level
    module for the head of a block list)."""
    match = _LAYER.match(module)
    return match.group(1) if match else (module or "model")


def _kind(namespace: str, name: str) -> OpKind:
    if namespace == "mmsim":
        return _CUSTOM[name]
    if name in _MATMUL:
        return "matmul"
    if name == "embedding":
        return "embedding"
    if name in _SOFTMAX:
        return "softmax"
    if name in _REDUCTION:
        return "reduction"
    if name in _ACTIVATION:
        return "activation"
    if name in _MEMORY:
        return "memory"
    if name in _NORM:
        return "norm"
    return "elementwise"


def _shape_text(tensors: list[torch.Tensor]) -> str:
    return " ".join(f"{list(t.shape)}{_DTYPES.get(t.dtype, str(t.dtype))}" for t in tensors)


def _work(kind: OpKind, name: str, args: tuple[Any, ...], ins: list[torch.Tensor],
          outs: list[torch.Tensor]) -> tuple[int, dict[str, int]]:
    """Operation count and shape facts of one op."""
    if kind == "ternary_matmul":
        x, packed, k = args[0], args[1], int(args[2])
        m, n = x.numel() // k, packed.shape[0]
        return m * n * k, {"m": m, "n": n, "k": k, "batch": 1, "parallel": n}
    if kind == "matmul" and name == "convolution":  # an implicit GEMM, per group
        x, w, groups = args[0], args[1], int(args[8])
        if args[6]:
            raise UserError("--model", "a transposed convolution is not modelled; expected "
                            "convolutions only")
        out = outs[0]
        m, n, k = out.numel() // out.shape[1], w.shape[0] // groups, math.prod(w.shape[1:])
        dims = {"m": m, "n": n, "k": k, "batch": groups, "parallel": groups * n}
        return 2 * groups * m * n * k, dims
    if kind == "matmul" and name == "convolution_backward":
        # (grad_out, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding,
        # groups, output_mask): the input and weight gradients it is asked for, each an
        # implicit GEMM of the forward's size (its bias gradient a sum)
        grad, w, groups, mask = args[0], args[2], int(args[9]), args[10]
        m, n, k = grad.numel() // grad.shape[1], w.shape[0] // groups, math.prod(w.shape[1:])
        passes = int(mask[0]) + int(mask[1])
        dims = {"m": m, "n": n, "k": k, "batch": groups * passes,
                "parallel": groups * passes * n}
        return 2 * groups * passes * m * n * k, dims
    if kind == "matmul":
        a, b = ins[-2], ins[-1]
        batch = a.shape[0] if a.dim() == 3 else 1
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        dims = {"m": m, "n": n, "k": k, "batch": batch, "parallel": batch * n}
        return 2 * batch * m * n * k, dims
    if kind == "attention":
        backward = name == "attention_backward"  # (grad, q, k, v, out, causal, window)
        at = 1 if backward else 0
        q, k = ins[at], ins[at + 1]
        b, h, sq, d = q.shape
        sk = k.shape[2]
        flags = args[3 + 2 * at:]
        causal, window = bool(flags[0]), int(flags[1]) if len(flags) > 1 else 0
        pairs = attention_pairs(sq, sk, causal, window)
        dims = {"batch": b, "heads": h, "kv_heads": k.shape[1], "q_len": sq, "kv_len": sk,
                "head_dim": d, "causal": int(causal), "pairs": pairs, "parallel": b * h}
        if window:  # only where there is one, so other traces read as before
            dims["window"] = window
        if backward:
            dims["backward"] = 1
            return int(ATTENTION_BACKWARD_FLOPS * 4 * b * h * d * pairs), dims
        return 4 * b * h * d * pairs, dims
    largest = outs[0] if kind == "embedding" else max([*ins, *outs], key=lambda t: t.numel())
    numel = largest.numel()
    rows = numel // max(1, largest.shape[-1]) if largest.dim() else 1
    ops, parallel = numel, numel
    if kind in {"reduction", "softmax", "norm", "embedding"}:
        numel = ins[0].numel() if kind != "embedding" else numel
        ops, parallel = numel, rows
    elif kind == "recurrence":
        ops, parallel = 2 * numel, ins[2].numel()
    return ops, {"numel": numel, "rows": rows, "parallel": max(1, parallel)}


@dataclass
class _Recorder(TorchDispatchMode):
    """Records ops; `roles` maps a base tensor id to 'weight' or 'state'."""

    roles: dict[int, str]
    modules: list[str] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    base: dict[int, int] = field(default_factory=dict)
    producer: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    last_use: dict[int, int] = field(default_factory=dict)
    keep: list[torch.Tensor] = field(default_factory=list)
    #: Inside a leaf module (a norm written as several ops): its inputs; ops not recorded.
    leaf: list[Any] | None = None

    def __post_init__(self) -> None:
        super().__init__()

    def _base(self, t: torch.Tensor) -> int:
        return self.base.get(id(t), id(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.keep.extend(outs)
        if self.leaf is not None:
            return out
        name, namespace = func.overloadpacket.__name__, func.namespace
        if is_alias(func):
            source = self._base(ins[0]) if ins else None
            for t in outs:
                if source is not None:
                    self.base[id(t)] = source
            return out
        if is_recorded(func, ins):
            mutated = {id(a) for a, spec in zip(args, func._schema.arguments, strict=False)
                       if isinstance(a, torch.Tensor) and spec.alias_info
                       and spec.alias_info.is_write}
            self._record(name, namespace, args, ins, outs, mutated)
        return out

    def module_now(self) -> str:
        """The module path of the op being recorded."""
        return self.modules[-1] if self.modules else ""

    def enter_leaf(self, inputs: list[torch.Tensor]) -> None:
        self.leaf = inputs

    def leave_leaf(self, weights: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        """Record a leaf module's ops as one norm op, as a fused kernel runs it."""
        ins, self.leaf = [*(self.leaf or []), *weights], None
        self._record("rms_norm", "mmsim", (), ins, outs, set())

    def _record(self, name: str, namespace: str, args: tuple[Any, ...],
                ins: list[torch.Tensor], outs: list[torch.Tensor], mutated: set[int]) -> None:
        index = len(self.ops)
        kind = _kind(namespace, name)
        weight = state_read = state_write = act_in = act_out = 0
        deps: set[int] = set()
        for t in ins:
            base = self._base(t)
            if base in self.producer:
                deps.add(self.producer[base])
            if id(t) in mutated:
                continue
            role = self.roles.get(base)
            if role == "weight":
                weight += _nbytes(outs[0]) if kind == "embedding" else _nbytes(t)
            elif role == "state":
                state_read += _nbytes(t)
            else:
                act_in += _nbytes(t)
                self.last_use[base] = index
        values = [a for a in ins if id(a) not in mutated and a.is_floating_point()]
        indexed = values[-1] if name in _INDEXED_WRITES and values else None
        for t in outs:
            if id(t) in mutated:
                base = self._base(t)
                self.base[id(t)] = base
                written = _nbytes(t if indexed is None else indexed)
                if self.roles.get(base) == "state":
                    state_write += written
                else:
                    act_out += written
                self.producer[base] = index
            else:
                act_out += _nbytes(t)
                self.producer[id(t)] = index
                self.sizes[id(t)] = _nbytes(t)
                self.last_use[id(t)] = index
        # an indexed write works on its new values, not on the whole tensor it writes into
        ops, dims = (_work(kind, name, args, ins, outs) if indexed is None
                     else _work(kind, name, args, [indexed], [indexed]))
        module = self.module_now()
        first = ins[0] if kind in {"matmul", "attention", "reduction", "softmax"} else outs[0]
        dtype = "int8" if kind == "ternary_matmul" else _DTYPES.get(first.dtype, "fp32")
        self.ops.append(Op(
            index=index, name=f"{namespace}.{name}", fn=name, kind=kind, module=module,
            layer=_layer(module), dtype=dtype, ops=int(ops), weight_bytes=weight,
            state_read_bytes=state_read, state_write_bytes=state_write, input_bytes=act_in,
            output_bytes=act_out, dims=dims, deps=tuple(sorted(deps)),
            shapes=f"{_shape_text(ins)} -> {_shape_text(outs)}"))

    def peak_activation_bytes(self) -> int:
        """Peak of live activation bytes, each freed after its last reader."""
        delta = [0] * (len(self.ops) + 2)
        for base, size in self.sizes.items():
            delta[self.producer.get(base, 0)] += size
            delta[self.last_use.get(base, 0) + 1] -= size
        live = peak = 0
        for change in delta:
            live += change
            peak = max(peak, live)
        return peak


def _hook_paths(model: torch.nn.Module, recorder: _Recorder,
                leaves: frozenset[str] = frozenset()) -> list[Any]:
    """Keep `recorder.modules` as the stack of module paths being run (hooks return None);
    the modules at `leaves` are recorded as one norm op each."""

    def enter(path: str) -> Any:
        return lambda _module, _args: recorder.modules.append(path) and None

    def leave(_module: Any, _args: Any, _out: Any) -> None:
        recorder.modules.pop()

    def enter_leaf(_module: Any, args: Any) -> None:
        recorder.enter_leaf([t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)])

    def leave_leaf(module: torch.nn.Module, _args: Any, out: Any) -> None:
        recorder.leave_leaf(list(module.parameters()),
                            [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])

    handles = []
    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(enter(path)))
            if path in leaves:
                handles.append(module.register_forward_pre_hook(enter_leaf))
                handles.append(module.register_forward_hook(leave_leaf))
            handles.append(module.register_forward_hook(leave))
    return handles


def capture(cfg: AnyModel, phase: Phase, batch: int, context: int, prompt: int) -> Trace:
    """Run one step of `cfg` on the meta device and record it.

    decode: `batch` sequences, one new token each, after `context` tokens of state.
    prefill: `batch` sequences of `prompt` tokens from an empty state.
    forward: one pass of an encoder or vision model over a batch of `batch` inputs.
    """
    step = prepare(cfg, phase, batch, context, prompt)
    unique = {id(t): t for t in [*step.model.parameters(), *step.model.buffers()]}
    roles = dict.fromkeys(unique, "weight")
    roles.update(dict.fromkeys((id(t) for t in step.state), "state"))
    recorder = _Recorder(roles=roles)
    handles = _hook_paths(step.model, recorder, step.leaves)
    try:
        with torch.no_grad(), recorder:
            step.run()
    finally:
        for handle in handles:
            handle.remove()
    return Trace(
        model=cfg.name, model_key=cfg.key(), phase=phase, batch=batch,
        context=context if phase == "decode" else 0, prompt=prompt if phase == "prefill" else 0,
        tokens=step.tokens, weights_bytes=sum(_nbytes(t) for t in unique.values()),
        state_bytes=sum(_nbytes(t) for t in step.state),
        activation_bytes=recorder.peak_activation_bytes(), ops=tuple(recorder.ops),
        expert_tokens=tuple(tuple(counts) for counts in step.expert_tokens))
