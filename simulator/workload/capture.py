"""Capture a Trace at the PyTorch dispatcher (the way torch.utils.flop_counter does).

The model runs on the `meta` device under a TorchDispatchMode: every aten/custom op is
seen with its shapes, dtypes and the module that called it, at no memory cost. Views
are followed to their base tensor so that weight, state and activation bytes, producer
dependencies and activation liveness are all known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from simulator.workload.trace import Op, OpKind, Phase, Trace
from workloads.build import build_model, make_inputs
from workloads.config import ModelConfig

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
           torch.int8: "int8", torch.uint8: "int8", torch.int32: "int32", torch.int64: "int32",
           torch.bool: "int8"}
_FACTORIES = {"empty", "zeros", "ones", "full", "scalar_tensor", "lift_fresh", "lift_fresh_copy",
              "empty_like", "zeros_like", "ones_like", "full_like", "empty_strided", "detach",
              "alias", "new_empty", "new_zeros"}
_ALIASING = {"_unsafe_view", "_reshape_alias"}
_ACTIVATION = {"sigmoid", "silu", "exp", "tanh", "gelu", "rsqrt", "sqrt", "log", "cos", "sin",
               "erf", "reciprocal"}
_REDUCTION = {"sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "argmax"}
_SOFTMAX = {"_softmax", "_safe_softmax", "softmax", "_log_softmax"}
_MEMORY = {"copy_", "clone", "cat", "stack", "index_copy", "index_copy_"}
_CUSTOM: dict[str, OpKind] = {"ternary_matmul": "ternary_matmul", "rms_norm": "norm",
                              "attention": "attention", "hgrn_scan": "recurrence"}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul"}
_LAYER = re.compile(r"^(layers\.\d+)")


def is_alias(func: Any) -> bool:
    """A view or re-labelling of its input: no work, no op of its own."""
    return bool(func.is_view) or func.overloadpacket.__name__ in _ALIASING


def is_recorded(func: Any, ins: list[torch.Tensor]) -> bool:
    """Whether an op becomes an Op of the trace (the rule every replay must share)."""
    return not is_alias(func) and func.overloadpacket.__name__ not in _FACTORIES and bool(ins)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _layer(module: str) -> str:
    match = _LAYER.match(module)
    return match.group(1) if match else (module.split(".")[0] or "model")


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
    if kind == "matmul":
        a, b = ins[-2], ins[-1]
        batch = a.shape[0] if a.dim() == 3 else 1
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        dims = {"m": m, "n": n, "k": k, "batch": batch, "parallel": batch * n}
        return 2 * batch * m * n * k, dims
    if kind == "attention":
        q, k = ins[0], ins[1]
        b, h, sq, d = q.shape
        sk = k.shape[2]
        causal = bool(args[3])
        pairs = sum(min(sk, sk - sq + i + 1) for i in range(sq)) if causal else sq * sk
        dims = {"batch": b, "heads": h, "kv_heads": k.shape[1], "q_len": sq, "kv_len": sk,
                "head_dim": d, "causal": int(causal), "pairs": pairs, "parallel": b * h}
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
        name, namespace = func.overloadpacket.__name__, func.namespace
        if is_alias(func):
            source = self._base(ins[0]) if ins else None
            for t in outs:
                if source is not None:
                    self.base[id(t)] = source
            return out
        if is_recorded(func, ins):
            self._record(func, name, namespace, args, ins, outs)
        return out

    def _record(self, func: Any, name: str, namespace: str, args: tuple[Any, ...],
                ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        index = len(self.ops)
        mutated = {id(a) for a, spec in zip(args, func._schema.arguments, strict=False)
                   if isinstance(a, torch.Tensor) and spec.alias_info and spec.alias_info.is_write}
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
        for t in outs:
            if id(t) in mutated:
                base = self._base(t)
                self.base[id(t)] = base
                if self.roles.get(base) == "state":
                    state_write += _nbytes(t)
                else:
                    act_out += _nbytes(t)
                self.producer[base] = index
            else:
                act_out += _nbytes(t)
                self.producer[id(t)] = index
                self.sizes[id(t)] = _nbytes(t)
                self.last_use[id(t)] = index
        ops, dims = _work(kind, name, args, ins, outs)
        module = self.modules[-1] if self.modules else ""
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


def _hook_paths(model: torch.nn.Module, recorder: _Recorder) -> list[Any]:
    """Keep `recorder.modules` as the stack of module paths being run (hooks return None)."""

    def enter(path: str) -> Any:
        return lambda _module, _args: recorder.modules.append(path) and None

    def leave(_module: Any, _args: Any, _out: Any) -> None:
        recorder.modules.pop()

    handles = []
    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(enter(path)))
            handles.append(module.register_forward_hook(leave))
    return handles


def capture(cfg: ModelConfig, phase: Phase, batch: int, context: int, prompt: int) -> Trace:
    """Run one step of `cfg` on the meta device and record it.

    decode: `batch` sequences, one new token each, after `context` tokens of state.
    prefill: `batch` sequences of `prompt` tokens from an empty state.
    """
    model = build_model(cfg)
    tokens, position = (1, context) if phase == "decode" else (prompt, 0)
    ids, state = make_inputs(cfg, batch, tokens, position)
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    roles = dict.fromkeys(unique, "weight")
    roles.update(dict.fromkeys((id(t) for t in state.tensors()), "state"))
    recorder = _Recorder(roles=roles)
    handles = _hook_paths(model, recorder)
    try:
        with torch.no_grad(), recorder:
            model(ids, state)
    finally:
        for handle in handles:
            handle.remove()
    return Trace(
        model=cfg.name, model_key=cfg.key(), phase=phase, batch=batch,
        context=context if phase == "decode" else 0, prompt=prompt if phase == "prefill" else 0,
        tokens=batch * tokens, weights_bytes=sum(_nbytes(t) for t in unique.values()),
        state_bytes=sum(_nbytes(t) for t in state.tensors()),
        activation_bytes=recorder.peak_activation_bytes(), ops=tuple(recorder.ops))
