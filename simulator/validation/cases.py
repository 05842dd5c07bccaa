"""Reference cases: published or measured values, and what the simulator says of them.

A case file (YAML) lists cases with the hardware, model and run they describe, the metric
compared, the published value with its source, a role and a tolerance. Roles:
`fitted` (a calibration point), `held-out` (predicted, never fitted), `projection` (a
published projection set against the realistic design: shown with its error and a note
that explains it, not gated), `open` (a known miss, shown with its error and what would
close it, not gated), `report` (printed for context, not checked). Reference
values are never inputs to the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from simulator.api import simulate
from simulator.engine.machine import host_transfer_ns
from simulator.errors import UserError, first_error
from simulator.hardware import load_hardware
from simulator.oprun import attention_flops, attention_op, gemm_op, run_op
from simulator.report import Result
from workloads.config import resolve_model

Metric = Literal["block_latency_s", "blocks_latency_s", "blocks_tokens_per_s", "latency_s",
                 "tokens_per_s", "power_w", "energy_per_token_j", "memory_bytes",
                 "input_vector_transfer_s", "fwd_bwd_tflops", "tflops", "latency_ratio",
                 "memory_ratio"]


class Kernel(BaseModel):
    """A single kernel instead of a model: attention (FlashAttention-2 shapes) or a GEMM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["attention", "gemm"]
    batch: int = 1
    heads: int = 1
    seq: int = 1
    head_dim: int = 64
    causal: bool = False
    m: int = 1
    n: int = 1
    k: int = 1
    dtype: str = "bf16"


class Versus(BaseModel):
    """The run a ratio metric divides by this case's run (versus / this)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    model_set: dict[str, Any] = Field(default_factory=dict)


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    description: str
    hardware: str
    hw_set: dict[str, Any] = Field(default_factory=dict)
    model: str = ""
    kernel: Kernel | None = None
    versus: Versus | None = None
    model_set: dict[str, Any] = Field(default_factory=dict)
    phase: Literal["decode", "prefill"] = "decode"
    batch: int = 1
    context: int = 2048
    prompt: int = 2048
    mapping: Literal["tensor", "batch"] = "tensor"
    metric: Metric
    reference: float
    source: str
    role: Literal["fitted", "held-out", "projection", "open", "report"]
    tolerance: float = Field(gt=0)
    note: str = ""


@dataclass(frozen=True)
class Outcome:
    case: Case
    simulated: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def error(self) -> float:
        return (self.simulated - self.case.reference) / self.case.reference

    @property
    def passed(self) -> bool:
        return not self.gated or abs(self.error) <= self.case.tolerance

    @property
    def gated(self) -> bool:
        """Whether the case must lie within its tolerance."""
        return self.case.role in ("fitted", "held-out")


def shipped_case_files() -> list[Path]:
    folder = resources.files("simulator.validation") / "data"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_cases(path: str | Path) -> list[Case]:
    """Read a case file; errors name the file and the case."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(str(path), f"cannot read the case file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise UserError(str(path), "expected a mapping with a list of 'cases'")
    cases = []
    for number, item in enumerate(data["cases"]):
        try:
            cases.append(Case.model_validate(item))
        except ValidationError as exc:
            field_name, message = first_error(exc.errors())
            raise UserError(f"{path}: cases[{number}].{field_name}", message) from None
    return cases


def _strings(values: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in values.items()}


def _blocks(result: Result) -> float:
    return sum(layer.latency_s for layer in result.layers if layer.name.startswith("layers."))


def _kernel(case: Case, kernel: Kernel) -> float:
    hw = load_hardware(case.hardware, case.hw_set)
    if kernel.type == "gemm":
        return run_op(hw, gemm_op(kernel.m, kernel.n, kernel.k, kernel.dtype, kernel.batch)).tflops
    shape = (kernel.batch, kernel.heads, kernel.seq, kernel.head_dim, kernel.causal)
    forward = run_op(hw, attention_op(*shape, False, kernel.dtype))
    if case.metric == "tflops":
        return attention_flops(*shape, False) / forward.latency_s * 1e-12
    backward = run_op(hw, attention_op(*shape, True, kernel.dtype))
    flops = attention_flops(*shape, False) + attention_flops(*shape, True)
    return flops / (forward.latency_s + backward.latency_s) * 1e-12


def _run(case: Case, model: str, model_set: dict[str, Any]) -> Result:
    key = json.dumps([case.hardware, case.hw_set, model, model_set, case.phase, case.batch,
                      case.context, case.prompt, case.mapping], sort_keys=True, default=str)
    if key not in _RUNS:
        _RUNS[key] = simulate(case.hardware, model, phase=case.phase, batch=case.batch,
                              context=case.context, prompt=case.prompt, mapping=case.mapping,
                              hw_set=case.hw_set, model_set=_strings(model_set))
    return _RUNS[key]


#: Results of identical runs within one process (ratio cases share their runs).
_RUNS: dict[str, Result] = {}


def measure(case: Case) -> float:
    """The simulator's value of the case's metric."""
    if case.kernel is not None:
        return _kernel(case, case.kernel)
    if case.metric == "input_vector_transfer_s":
        hw = load_hardware(case.hardware, case.hw_set)
        cfg = resolve_model(case.model, _strings(case.model_set))
        return host_transfer_ns(hw, cfg.hidden_size * cfg.dtype_bytes) * 1e-9
    result = _run(case, case.model, case.model_set)
    if case.metric in ("latency_ratio", "memory_ratio"):
        if case.versus is None:
            raise UserError(case.id, f"{case.metric} needs 'versus'")
        other = _run(case, case.versus.model, case.versus.model_set)
        if case.metric == "latency_ratio":
            return other.latency_s / result.latency_s
        return other.memory_bytes / result.memory_bytes
    if case.metric == "block_latency_s":
        return next(layer.latency_s for layer in result.layers if layer.name == "layers.0")
    if case.metric == "blocks_latency_s":
        return _blocks(result)
    if case.metric == "blocks_tokens_per_s":
        return case.batch / _blocks(result)
    return float(getattr(result, case.metric))


def run_cases(cases: list[Case]) -> list[Outcome]:
    return [Outcome(case, measure(case)) for case in cases]
