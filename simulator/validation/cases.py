"""Reference cases: published or measured values, and what the simulator says of them.

A case file (YAML) lists cases with the hardware, model and run they describe, the metric
compared, the published value with its source, a role and a tolerance. Roles:
- `fitted`: a calibration point (gated at ±10 %);
- `held-out`: simulated by the engine, nothing fitted to it, and not an algebraic
  restatement of a fitted case or of the paper's own projection rule (gated at ±15 %);
  the only role that counts as independent evidence;
- `consistency`: a restatement (the same configuration as a fitted case compared with
  another measurement of it, the paper's projection arithmetic reproduced, a ratio of two
  other cases): printed and gated like held-out, never counted as evidence;
- `projection`: a published projection set against the realistic design (not gated);
- `open`: a known miss, shown with its error and what would close it (not gated);
- `report`: printed for context, not checked.
A file's optional `defaults` mapping gives fields shared by its cases (a case's own value
wins). A gate wider than its role's standard needs a `gate_reason`; such cases are counted
apart. A derived metric (TFLOPs/s, tokens/s, ratios) names its `formula` and the
`formula_source` it was read from. Reference values are never inputs to the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from simulator.api import simulate
from simulator.collective import run_collective
from simulator.engine import simulate_tasks
from simulator.errors import UserError, first_error
from simulator.hardware import load_hardware
from simulator.hardware.system import load_system
from simulator.oprun import Mode, gemm_op, run_attention, run_op, run_stream
from simulator.report import Result
from simulator.yamlfile import load_yaml
from workloads.config import resolve_model

Metric = Literal["block_latency_s", "blocks_latency_s", "blocks_tokens_per_s", "latency_s",
                 "tokens_per_s", "power_w", "energy_per_token_j", "memory_bytes",
                 "input_vector_transfer_s", "tflops", "latency_ratio", "memory_ratio",
                 "bandwidth_bytes_per_s", "block_latency_ratio", "alltoall_time_ratio",
                 "generate_latency_s", "serving_latency_s", "serving_speedup",
                 "serving_output_tokens_per_s", "model_tflops_per_gpu", "mfu", "step_time_s",
                 "peak_memory_bytes", "max_seq_len", "fits_memory", "out_of_memory"]
Role = Literal["fitted", "held-out", "consistency", "projection", "open", "report"]
ROLES: tuple[Role, ...] = ("fitted", "held-out", "consistency", "projection", "open", "report")
#: The standard gate of each gated role (a wider one needs a `gate_reason`).
GATES: dict[str, float] = {"fitted": 0.10, "held-out": 0.15, "consistency": 0.15}
#: Metrics computed from others by a formula: a case comparing one names it and its source.
DERIVED = {"tflops", "tokens_per_s", "blocks_tokens_per_s", "energy_per_token_j",
           "latency_ratio", "memory_ratio", "bandwidth_bytes_per_s", "block_latency_ratio",
           "alltoall_time_ratio", "serving_speedup",
           "serving_output_tokens_per_s", "model_tflops_per_gpu", "mfu"}
#: What a kernel case may measure.
KERNEL_METRICS = ("tflops", "latency_s", "bandwidth_bytes_per_s")


class Kernel(BaseModel):
    """A single kernel instead of a model: attention (FlashAttention-2 shapes) or a GEMM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["attention", "gemm", "stream", "collective"]
    mode: Mode = Field(default="fwd", description="attention: fwd, bwd or fwd_bwd")
    batch: int = 1
    heads: int = 1
    seq: int = 1
    head_dim: int = 64
    causal: bool = False
    m: int = 1
    n: int = 1
    k: int = 1
    dtype: str = "bf16"
    weight_dtype: str = Field(default="", description="gemm: the weights' dtype (default dtype)")
    stream: str = Field(default="read", description="stream: init, read, scale or triad")
    threads: int = Field(default=2048, description="stream: resident threads per core")
    elements: int = Field(default=1 << 27, description="stream: doubles per array")
    collective: str = Field(default="allreduce", description="collective: which one")
    algorithm: str = Field(default="ring", description="collective: ring, tree or nvls")
    bytes: int = Field(default=1 << 30, description="collective: nccl-tests size")
    devices: int | None = Field(default=None, description="collective: ranks (default all)")


class Versus(BaseModel):
    """The run a ratio metric divides by this case's run (versus / this)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    model_set: dict[str, Any] = Field(default_factory=dict)
    quant: str | None = None
    #: expert parallelism of the other run (None: the case's own)
    placement: str | None = None
    ep_mode: Literal["combine", "coherent"] | None = None


class Serving(BaseModel):
    """A request stream through `simulate serve` (the serving metrics): its makespan
    (serving_latency_s), its output tokens over that (serving_output_tokens_per_s), or the
    `baseline` scheduler's makespan over this one's (serving_speedup)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheduler: str
    baseline: str | None = None
    requests: dict[str, Any] = Field(description="the request spec (serving.requests)")
    bucket: int = 16
    max_sequences: int = Field(256, ge=1, description="the server's batch limit")


class Training(BaseModel):
    """A training step (`--phase train`): `batch` is the global batch of sequences and
    `prompt` their length (simulator.training)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    micro_batch: int | None = Field(None, ge=1)
    dp: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    #: model chunks per pipeline stage (Megatron's interleaved 1F1B)
    pp_interleave: int = Field(1, ge=1)
    sp: int = Field(1, ge=1)
    zero: int = Field(0, ge=0, le=3)
    recompute: Literal["none", "selective", "full"] = "none"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    offload: Literal["activations"] | None = None
    #: FPDT's chunk tokens (simulator.training.chunked)
    chunk: int | None = Field(None, ge=1)
    #: low-rank adapters (--lora rank=R,modules=…), CLIP's class prompts a step (--classes)
    lora: str | None = None
    classes: int | None = Field(None, ge=1)
    #: max_seq_len: the model setting raised with the sequence length as it doubles
    positions: str = "max_position_embeddings"


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
    phase: Literal["decode", "prefill", "forward", "train"] = "decode"
    batch: int = 1
    context: int = 2048
    prompt: int = 2048
    mapping: Literal["tensor", "batch"] = "tensor"
    #: the host runtime the measurement ran under (None: the hardware file's)
    runtime: Literal["eager", "cuda_graphs"] | None = None
    #: a quantization scheme (--quant) the measured model ran with
    quant: str | None = None
    #: expert parallelism (--ep, --placement, --ep-mode) on a system
    ep: int = 1
    placement: str | None = None
    ep_mode: Literal["combine", "coherent"] = "combine"
    #: tensor parallelism (--tp) on a system
    tp: int = 1
    #: generate_latency_s: tokens generated after the prompt (one decode step each)
    generate: int = 0
    #: serving metrics: the request stream and its schedulers
    serving: Serving | None = None
    #: phase train: the step's parallelism, recomputation and optimizer
    training: Training | None = None
    metric: Metric
    reference: float
    source: str
    role: Role
    tolerance: float = Field(gt=0)
    gate_reason: str = ""
    formula: str = ""
    formula_source: str = ""
    group: str = Field(default="", description="cases of one curve, checked for one-sided bias")
    note: str = ""

    @model_validator(mode="after")
    def _honest(self) -> Case:
        if self.widened and not self.gate_reason:
            raise ValueError(f"a {self.role} case is gated at ±{GATES[self.role]:.0%}; a "
                             f"tolerance of {self.tolerance:g} needs a gate_reason")
        if self.kernel is not None and self.metric not in KERNEL_METRICS:
            raise ValueError(f"a kernel case measures {', '.join(KERNEL_METRICS)}, not "
                             f"{self.metric}")
        if self.metric in DERIVED and not (self.formula and self.formula_source):
            raise ValueError(f"metric {self.metric} is derived: give its formula and "
                             "formula_source")
        return self

    @property
    def widened(self) -> bool:
        """Gated wider than its role's standard (with a stated reason)."""
        standard = GATES.get(self.role)
        return standard is not None and self.tolerance > standard + 1e-12


class Empirical(BaseModel):
    """A calibrated parameter that is a curve-fit term, not a mechanism: said in `validate`
    with the cases that show the model without it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parameter: str
    hardware: list[str] = Field(min_length=1)
    reason: str
    without: list[str] = Field(default_factory=list, description="case ids run without it")


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
        return self.case.role in GATES


def shipped_case_files() -> list[Path]:
    folder = resources.files("simulator.validation") / "data"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(str(path), f"cannot read the case file ({exc})") from None
    data = load_yaml(text, str(path))
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise UserError(str(path), "expected a mapping with a list of 'cases'")
    unknown = set(data) - {"cases", "defaults", "empirical"}
    if unknown:
        raise UserError(str(path), f"unknown top-level key(s) {', '.join(sorted(unknown))}; "
                                   "expected 'defaults', 'empirical' and 'cases'")
    return data


def _empirical(path: str | Path, items: Any) -> list[Empirical]:
    if not isinstance(items, list):
        raise UserError(f"{path}: empirical", "expected a list")
    found = []
    for number, item in enumerate(items):
        try:
            found.append(Empirical.model_validate(item))
        except ValidationError as exc:
            field_name, message = first_error(exc.errors())
            raise UserError(f"{path}: empirical[{number}].{field_name}", message) from None
    return found


def load_case_file(path: str | Path) -> tuple[list[Case], list[Empirical]]:
    """A case file's cases and the curve-fit terms it declares, read once; errors name the
    file and the case."""
    data = _read(path)
    return _cases(path, data), _empirical(path, data.get("empirical") or [])


def load_empirical(path: str | Path) -> list[Empirical]:
    """The curve-fit terms a case file declares."""
    return load_case_file(path)[1]


def load_cases(path: str | Path) -> list[Case]:
    """Read a case file's cases; errors name the file and the case."""
    return load_case_file(path)[0]


def _cases(path: str | Path, data: dict[str, Any]) -> list[Case]:
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise UserError(f"{path}: defaults", "expected a mapping of case fields")
    cases = []
    for number, item in enumerate(data["cases"]):
        try:
            cases.append(Case.model_validate({**defaults, **item} if isinstance(item, dict)
                                             else item))
        except ValidationError as exc:
            field_name, message = first_error(exc.errors())
            raise UserError(f"{path}: cases[{number}].{field_name}", message) from None
    return cases


def _strings(values: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in values.items()}


def _block(result: Result) -> float:
    """The first block's latency (layers.0)."""
    return next(layer.latency_s for layer in result.layers if layer.name == "layers.0")


def _blocks(result: Result) -> float:
    return sum(layer.latency_s for layer in result.layers if layer.name.startswith("layers."))


def _kernel(case: Case, kernel: Kernel) -> float:
    """The kernel's TFLOP/s, latency or bandwidth (a collective's: busbw), by the same
    code path as `simulate op`."""
    if kernel.type == "collective":
        system, _ = load_system(case.hardware, case.hw_set)
        done = run_collective(system, kernel.collective, kernel.bytes, kernel.devices,
                              kernel.algorithm)
        return done.latency_s if case.metric == "latency_s" else done.busbw_bytes_per_s
    hw = load_hardware(case.hardware, case.hw_set)
    if kernel.type == "gemm":
        result = run_op(hw, gemm_op(kernel.m, kernel.n, kernel.k, kernel.dtype, kernel.batch,
                                    kernel.weight_dtype))
    elif kernel.type == "stream":
        result = run_stream(hw, kernel.stream, kernel.threads, kernel.elements)
    else:
        result = run_attention(hw, kernel.batch, kernel.heads, kernel.seq, kernel.head_dim,
                               kernel.causal, kernel.mode, kernel.dtype)
    if case.metric == "latency_s":
        return result.latency_s
    if case.metric == "bandwidth_bytes_per_s":
        return result.bytes_moved / result.latency_s
    return result.tflops


def _host_transfer_s(case: Case) -> float:
    """The engine's time to move one input vector (hidden × dtype bytes) host → card."""
    hw = load_hardware(case.hardware, case.hw_set)
    cfg = resolve_model(case.model, _strings(case.model_set))
    timeline = simulate_tasks(hw, [], cfg.hidden_size * cfg.dtype_bytes)
    return timeline.usage.busy_ns.get("host", 0.0) * 1e-9


def _run(case: Case, model: str, model_set: dict[str, Any], quant: str | None,
         placement: str | None = None, ep_mode: str | None = None) -> Result:
    placement = case.placement if placement is None else placement
    ep_mode = case.ep_mode if ep_mode is None else ep_mode
    key = json.dumps([case.hardware, case.hw_set, model, model_set, case.phase, case.batch,
                      case.context, case.prompt, case.mapping, case.runtime, quant, case.ep,
                      placement, ep_mode, case.tp], sort_keys=True, default=str)
    if key not in _RUNS:
        _RUNS[key] = simulate(case.hardware, model, phase=case.phase, batch=case.batch,
                              context=case.context, prompt=case.prompt, mapping=case.mapping,
                              hw_set=case.hw_set, model_set=_strings(model_set),
                              runtime=case.runtime, quant=quant, ep=case.ep,
                              placement=placement, ep_mode=ep_mode, tp=case.tp)
    return _RUNS[key]


def _generate_s(case: Case) -> float:
    """One request end to end: the prompt's prefill, then `generate` decode steps at
    contexts prompt … prompt + generate − 1, summed by Simpson's rule over the first,
    middle and last step (a step's time is near-affine in its context)."""
    prefill = _run(case.model_copy(update={"phase": "prefill"}), case.model, case.model_set,
                   case.quant).latency_s
    n = case.generate
    steps = [_run(case.model_copy(update={"phase": "decode", "context": context}), case.model,
                  case.model_set, case.quant).latency_s
             for context in (case.prompt, case.prompt + (n - 1) // 2, case.prompt + n - 1)]
    return prefill + n * (steps[0] + 4 * steps[1] + steps[2]) / 6


#: serving step times by (machine, overrides, model, its overrides, tp, runtime): the cases
#: of a table share their steps (a step's time does not depend on the scheduler)
_STEPS: dict[str, dict[Any, Any]] = {}


def _served(case: Case, scheduler: str) -> dict[str, Any]:
    from simulator.serving.loop import Options
    from simulator.serving.requests import load_spec
    from simulator.serving.serve import run_serving

    assert case.serving is not None
    spec = load_spec(case.serving.requests, f"{case.id}: serving.requests")
    options = Options(scheduler=scheduler, bucket=case.serving.bucket,
                      max_sequences=case.serving.max_sequences)
    done = run_serving(case.hardware, case.model, spec, options,
                       model_set=_strings(case.model_set), tp=case.tp, runtime=case.runtime,
                       hw_set=case.hw_set or None, memo=_STEPS.setdefault(_memo_group(case), {}))
    return done.summary


def _serving(case: Case) -> float:
    """First arrival to last completion of the case's requests (serving_latency_s), output
    tokens over that (serving_output_tokens_per_s), or the baseline scheduler's makespan
    over the case's scheduler's (serving_speedup)."""
    if case.serving is None:
        raise UserError(case.id, f"{case.metric} needs 'serving'")
    mine = _served(case, case.serving.scheduler)
    if case.metric == "serving_latency_s":
        return float(mine["makespan_s"])
    if case.metric == "serving_output_tokens_per_s":
        return float(mine["output_tokens_per_s"])
    if case.serving.baseline is None:
        raise UserError(case.id, "serving_speedup needs 'serving.baseline'")
    return float(_served(case, case.serving.baseline)["makespan_s"] / mine["makespan_s"])


def _alltoall_s(result: Result) -> float:
    """Seconds of all-to-all on one device's path through the step."""
    if result.system is None:
        return 0.0
    return sum(c.time_s for c in result.system.collectives if c.collective == "alltoall")


#: Results of identical runs within one process (ratio cases share their runs).
_RUNS: dict[str, Result] = {}


#: max_seq_len: the longest sequence probed (2²⁴ tokens)
LONGEST_PROBE = 1 << 24


def _train(case: Case) -> float:
    """The step's metric; max_seq_len: the longest sequence, doubling from `prompt`, whose
    step fits every device's memory (0 if `prompt` does not); fits_memory 1 where the step
    fits every device's memory, else 0, out_of_memory the reverse. A case that leaves
    `prompt` out runs the model's default length (an encoder's: its image tokens)."""
    from simulator.training import TrainingResult, simulate_training

    step = case.training or Training()

    def run(seq_len: int, model_set: dict[str, str]) -> TrainingResult:
        return simulate_training(
            case.hardware, case.model, batch=case.batch, seq_len=seq_len,
            micro_batch=step.micro_batch, recompute=step.recompute, optimizer=step.optimizer,
            dp=step.dp, tp=step.tp, pp=step.pp, pp_interleave=step.pp_interleave, sp=step.sp,
            zero=step.zero, offload=step.offload, chunk=step.chunk, lora=step.lora,
            classes=step.classes, hw_set=case.hw_set, model_set=model_set)

    prompt = case.prompt if "prompt" in case.model_fields_set else None
    if case.metric in ("fits_memory", "out_of_memory"):
        oom = run(prompt, _strings(case.model_set)).out_of_memory is not None
        return float(oom if case.metric == "out_of_memory" else not oom)
    if case.metric != "max_seq_len":
        return float(getattr(run(prompt, _strings(case.model_set)), case.metric))
    fits, seq_len = 0, case.prompt
    while seq_len <= LONGEST_PROBE:
        if run(seq_len, {**_strings(case.model_set), step.positions: str(seq_len)}
               ).out_of_memory:
            break
        fits, seq_len = seq_len, seq_len * 2
    return float(fits)


def measure(case: Case) -> float:
    """The simulator's value of the case's metric."""
    if case.phase == "train":
        return _train(case)
    if case.kernel is not None:
        return _kernel(case, case.kernel)
    if case.metric == "input_vector_transfer_s":
        return _host_transfer_s(case)
    if case.metric in ("serving_latency_s", "serving_speedup", "serving_output_tokens_per_s"):
        return _serving(case)
    if case.metric == "generate_latency_s":
        if case.generate < 1:
            raise UserError(case.id, "generate_latency_s needs 'generate', the tokens made")
        return _generate_s(case)
    result = _run(case, case.model, case.model_set, case.quant)
    if case.metric in ("latency_ratio", "memory_ratio", "block_latency_ratio",
                       "alltoall_time_ratio"):
        if case.versus is None:
            raise UserError(case.id, f"{case.metric} needs 'versus'")
        versus = case.versus
        other = _run(case, versus.model, versus.model_set, versus.quant, versus.placement,
                     versus.ep_mode)
        if case.metric == "alltoall_time_ratio":
            mine = _alltoall_s(result)
            return _alltoall_s(other) / mine if mine else float("inf")
        if case.metric == "latency_ratio":
            return other.latency_s / result.latency_s
        if case.metric == "block_latency_ratio":
            return _block(other) / _block(result)
        return other.memory_bytes / result.memory_bytes
    if case.metric == "block_latency_s":
        return _block(result)
    if case.metric == "blocks_latency_s":
        return _blocks(result)
    if case.metric == "blocks_tokens_per_s":
        return case.batch / _blocks(result)
    return float(getattr(result, case.metric))


def _memo_group(case: Case) -> str:
    """The cases that share memoized runs: a serving table's by its step memo, the rest by
    machine."""
    if case.phase == "train":  # one capture and step each: apart from the inference runs
        return json.dumps(["train", case.hardware, case.model])
    if case.serving is not None:
        return json.dumps(["serving", case.hardware, case.hw_set, case.model, case.model_set,
                           case.tp, case.runtime], sort_keys=True, default=str)
    return json.dumps(["runs", case.hardware])


def _measure_all(cases: list[Case]) -> list[float]:
    return [measure(case) for case in cases]


def run_cases(cases: list[Case], jobs: int = 1) -> list[Outcome]:
    """Each case's outcome, in order. `jobs` > 1 spreads the groups of cases that share
    memoized runs over that many processes, the costliest first (serving tables on the
    most devices); the values are the same as in one process."""
    if jobs < 1:
        raise UserError("--jobs", f"expected a positive number of processes, not {jobs}")
    groups: dict[str, list[int]] = {}
    for number, case in enumerate(cases):
        groups.setdefault(_memo_group(case), []).append(number)
    if jobs == 1 or len(groups) == 1:
        return [Outcome(case, measure(case)) for case in cases]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    def cost(members: list[int]) -> tuple[int, int]:
        first = cases[members[0]]
        return (first.serving is not None) * first.tp * len(members), len(members)

    order = sorted(groups.values(), key=cost, reverse=True)
    values: dict[int, float] = {}
    with ProcessPoolExecutor(min(jobs, len(order)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [(members, pool.submit(_measure_all, [cases[i] for i in members]))
                   for members in order]
        for members, future in futures:
            values.update(zip(members, future.result(), strict=True))
    return [Outcome(case, values[number]) for number, case in enumerate(cases)]
