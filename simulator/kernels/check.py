"""`simulate check`: run a small model through the hardware kernels along the simulated
schedule and compare every layer and the logits with the PyTorch reference."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from simulator.errors import UserError
from simulator.hardware.schema import Hardware
from simulator.hardware.select import UnratedDtype, check_mapping
from simulator.kernels.functional import Executor, Fault, OpCheck, Replay, counts
from simulator.mapping import Mapping, map_trace
from simulator.workload.cache import get_trace
from simulator.workload.trace import Phase
from workloads.build import build_model, make_inputs
from workloads.config import ModelConfig

#: A functional check runs the model for real on the CPU: keep it small.
MAX_PARAMETERS = 50_000_000
#: Relative error (max |hw − ref| / max |ref|) allowed per layer, by model dtype: kernels
#: compute in fp32 and round where PyTorch rounds, so only rounding order differs.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-2}
SEED = 0


@dataclass(frozen=True)
class LayerCheck:
    name: str
    max_abs: float
    max_rel: float
    passed: bool


@dataclass
class CheckResult:
    hardware: str
    model: str
    mapping: str
    tolerance: float
    layers: list[LayerCheck]
    ops: list[OpCheck] = field(repr=False)
    #: the tiles, blocks and chunks each kernel op ran, by op index (simulator.decompose)
    executed: dict[int, list[Any]] = field(default_factory=dict, repr=False)

    @property
    def kernel_failures(self) -> list[OpCheck]:
        """Kernel ops that disagree with PyTorch on the same inputs (integer ops exactly)."""
        return [op for op in self.ops if op.by_kernel and (
            op.max_abs > 0 if op.kind == "ternary_matmul" else op.max_rel > self.tolerance)]

    @property
    def passed(self) -> bool:
        return all(layer.passed for layer in self.layers) and not self.kernel_failures

    @property
    def unchecked(self) -> list[OpCheck]:
        """Kernel ops some of whose timed tiles, blocks or chunks the check did not run."""
        return [op for op in self.ops if op.by_kernel and op.tiles_checked != op.tiles_timed]

    def by_kind(self) -> dict[str, tuple[int, int, int, float]]:
        """Per kernel kind: (ops, tiles timed, tiles checked, max relative error)."""
        rows: dict[str, tuple[int, int, int, float]] = {}
        for op in self.ops:
            if op.by_kernel:
                ops, timed, checked, worst = rows.get(op.kind, (0, 0, 0, 0.0))
                rows[op.kind] = (ops + 1, timed + op.tiles_timed, checked + op.tiles_checked,
                                 max(worst, op.max_rel))
        return dict(sorted(rows.items()))

    def to_dict(self) -> dict[str, Any]:
        by_kernel, by_reference = counts(self.ops)
        return {"hardware": self.hardware, "model": self.model, "mapping": self.mapping,
                "tolerance": self.tolerance, "passed": self.passed, "schedule": "timed",
                "layers": [layer.__dict__ for layer in self.layers],
                "kernel_ops": dict(sorted(by_kernel.items())),
                "reference_ops": dict(sorted(by_reference.items())),
                "ops": [_op_dict(op) for op in self.ops if op.by_kernel],
                "unchecked_ops": [op.index for op in self.unchecked],
                "kernel_failures": [op.__dict__ for op in self.kernel_failures]}


def _op_dict(op: OpCheck) -> dict[str, Any]:
    """One kernel op of the JSON report: the timed units it ran, and its error."""
    return {"index": op.index, "name": op.name, "kind": op.kind,
            "tiles_timed": op.tiles_timed, "tiles_checked": op.tiles_checked,
            "max_abs_error": op.max_abs, "max_rel_error": op.max_rel}


def _initialise(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Seeded random weights (ternarised where the model is ternary)."""
    from workloads.hgrn_bit import BitLinear

    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BitLinear):
                module.load_float_weight(torch.randn(module.out_features, module.in_features,
                                                     generator=generator))
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith(("norm_weight", "weight")) and parameter.dim() == 1:
                parameter.copy_(1 + 0.1 * noise)
            elif parameter.dim() == 2:
                parameter.copy_(noise * parameter.shape[-1] ** -0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("lower_bound"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) * 0.5)


def _watch(model: torch.nn.Module, cfg: ModelConfig, replay: Replay | None = None
           ) -> tuple[dict[str, torch.Tensor], list[Any]]:
    seen: dict[str, torch.Tensor] = {}
    quiet = replay.pause if replay else contextlib.nullcontext
    names = ["embed", *[f"layers.{i}" for i in cfg.layer_ids], "norm", "lm_head"]
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        def keep(_m: Any, _a: Any, out: torch.Tensor, name: str = name) -> None:
            with quiet():
                seen[name] = out.detach().float().clone()
        handles.append(modules[name].register_forward_hook(keep))
    return seen, handles


def run_check(hw: Hardware, cfg: ModelConfig, *, mapping: Mapping = "tensor", batch: int = 1,
              phase: Phase = "decode", context: int = 8, prompt: int = 8,
              fault: Fault | None = None) -> CheckResult:
    """Compare the hardware schedule's numbers with the PyTorch reference."""
    cfg.check_positions(phase, context, prompt)  # before the CPU model is built
    check_mapping(hw, mapping)
    model = build_model(cfg, "cpu")
    parameters = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers())
    if parameters > MAX_PARAMETERS:
        raise UserError("--model", f"{cfg.name} has {parameters / 1e6:.0f} M parameters; a "
                        f"functional check runs it on the CPU: at most "
                        f"{MAX_PARAMETERS / 1e6:.0f} M (try --model tiny)")
    _initialise(model, cfg)
    tokens, position = (1, context) if phase == "decode" else (prompt, 0)
    generator = torch.Generator().manual_seed(SEED + 1)
    ids, state = make_inputs(cfg, batch, tokens, position, "cpu")
    ids.copy_(torch.randint(0, cfg.vocab_size, ids.shape, generator=generator))
    for tensor in state.tensors():
        tensor.copy_(0.5 * torch.randn(tensor.shape, generator=generator))
    trace = get_trace(cfg, phase, batch, context if phase == "decode" else 0,
                      prompt if phase == "prefill" else 0)
    try:
        tasks = map_trace(trace, hw, mapping)
    except UnratedDtype as exc:
        raise exc.for_model(cfg.name) from None

    reference, handles = _watch(model, cfg)
    with torch.no_grad():
        model(ids, copy.deepcopy(state))
    for handle in handles:
        handle.remove()
    executor = Executor(trace.ops, tasks, fault)
    replay = Replay(executor)
    computed, handles = _watch(model, cfg, replay)
    fresh = copy.deepcopy(state)  # outside the replay: only the model's own ops are numbered
    with torch.no_grad(), replay:
        model(ids, fresh)
    for handle in handles:
        handle.remove()
    tolerance = TOLERANCE[cfg.torch_dtype]
    layers = []
    for name, ref in reference.items():
        error = float((computed[name] - ref).abs().max())
        relative = error / (float(ref.abs().max()) or 1.0)
        layers.append(LayerCheck(name, error, relative, relative <= tolerance))
    return CheckResult(hw.name, cfg.name, mapping, tolerance, layers, executor.checks,
                       executor.executed)
