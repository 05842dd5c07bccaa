"""Reference cases: published or measured values, and what the simulator says of them.

A case file (YAML) lists cases with the hardware, model and run they describe, the metric
compared, the published value with its source, a role and a tolerance. Roles:
`fitted` (a calibration point), `held-out` (predicted, never fitted), `projection` (a
published projection set against the realistic design: shown with its error and a note
that explains it, not gated), `report` (printed for context, not checked). Reference
values are never inputs to the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from simulator.api import simulate
from simulator.engine.machine import host_transfer_ns
from simulator.errors import UserError
from simulator.hardware import load_hardware
from simulator.report import Result
from workloads.config import resolve_model

Metric = Literal["block_latency_s", "blocks_latency_s", "blocks_tokens_per_s", "latency_s",
                 "tokens_per_s", "power_w", "energy_per_token_j", "memory_bytes",
                 "input_vector_transfer_s"]


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    description: str
    hardware: str
    hw_set: dict[str, Any] = Field(default_factory=dict)
    model: str
    model_set: dict[str, Any] = Field(default_factory=dict)
    phase: Literal["decode", "prefill"] = "decode"
    batch: int = 1
    context: int = 2048
    prompt: int = 2048
    mapping: Literal["tensor", "batch"] = "tensor"
    metric: Metric
    reference: float
    source: str
    role: Literal["fitted", "held-out", "projection", "report"]
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
            error = exc.errors()[0]
            field_name = ".".join(str(p) for p in error["loc"])
            raise UserError(f"{path}: cases[{number}].{field_name}", error["msg"]) from None
    return cases


def _strings(values: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in values.items()}


def _blocks(result: Result) -> float:
    return sum(layer.latency_s for layer in result.layers if layer.name.startswith("layers."))


def measure(case: Case) -> float:
    """The simulator's value of the case's metric."""
    if case.metric == "input_vector_transfer_s":
        hw = load_hardware(case.hardware, case.hw_set)
        cfg = resolve_model(case.model, _strings(case.model_set))
        return host_transfer_ns(hw, cfg.hidden_size * cfg.dtype_bytes) * 1e-9
    result = simulate(case.hardware, case.model, phase=case.phase, batch=case.batch,
                      context=case.context, prompt=case.prompt, mapping=case.mapping,
                      hw_set=case.hw_set, model_set=_strings(case.model_set))
    if case.metric == "block_latency_s":
        return next(layer.latency_s for layer in result.layers if layer.name == "layers.0")
    if case.metric == "blocks_latency_s":
        return _blocks(result)
    if case.metric == "blocks_tokens_per_s":
        return case.batch / _blocks(result)
    return float(getattr(result, case.metric))


def run_cases(cases: list[Case]) -> list[Outcome]:
    return [Outcome(case, measure(case)) for case in cases]
