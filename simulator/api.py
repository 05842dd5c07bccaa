"""The Python API: `simulate(hw, model, ...)` → Result, mirroring the CLI."""

from __future__ import annotations

from collections.abc import Mapping as MappingType
from pathlib import Path
from typing import Any, get_args

from simulator.engine import Timeline, simulate_tasks
from simulator.errors import Infeasible, UserError
from simulator.hardware import Hardware
from simulator.hardware.schema import Runtime
from simulator.hardware.select import UnratedDtype, check_mapping
from simulator.mapping import (
    DEFAULT_GRANULARITY,
    Links,
    Mapping,
    Task,
    UnsupportedPair,
    map_trace,
)
from simulator.power import energy
from simulator.report import Result, build_result
from simulator.workload.cache import get_trace
from simulator.workload.trace import Phase, Trace
from workloads.config import resolve_model
from workloads.models import AnyModel

DEFAULT_CONTEXT = 2048
DEFAULT_PROMPT = 2048
#: Upper bounds that keep a request meaningful (and a simulation finite).
MAX_BATCH, MAX_TOKENS = 1 << 16, 1 << 22
#: Bytes the host sends per token (its id) at the start of a step.
HOST_BYTES_PER_TOKEN = 8


def _check_shape(phase: str, batch: int, context: int, prompt: int) -> None:
    """Refuse a step shape no model can run. The model's own limit (max_position_embeddings)
    is `ModelConfig.check_positions`, which `get_trace` applies to every simulated model."""
    if phase not in ("decode", "prefill", "forward"):
        raise UserError("--phase", f"expected 'decode', 'prefill' or 'forward', not '{phase}'")
    for flag, value, low, high in (("--batch", batch, 1, MAX_BATCH),
                                   ("--context", context, 0, MAX_TOKENS),
                                   ("--prompt", prompt, 1, MAX_TOKENS)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UserError(flag, f"expected a whole number from {low} to {high}, not {value!r}")


def step_shape(cfg: AnyModel, phase: str | None, batch: int, context: int | None,
               prompt: int | None) -> tuple[str, int, int]:
    """The (phase, context, prompt) a step of `cfg` runs with, checked. None takes the
    default: decode for a causal LM, forward for an encoder; a context and prompt of 2048 or
    as many as the model's positions allow. The one the phase does not use is 0."""
    phase = cfg.phases[0] if phase is None else phase
    limit = cfg.position_limit
    if context is None:
        context = DEFAULT_CONTEXT if limit is None else min(DEFAULT_CONTEXT, limit - 1)
    if prompt is None:
        prompt = DEFAULT_PROMPT if limit is None else min(DEFAULT_PROMPT, limit)
    _check_shape(phase, batch, context, prompt)
    return phase, (context if phase == "decode" else 0), (prompt if phase == "prefill" else 0)


def check_fits(hw: Hardware, trace: Trace) -> None:
    """Refuse a step whose weights, state and activations exceed the chip's DRAM."""
    need = trace.weights_bytes + trace.state_bytes + trace.activation_bytes
    have = hw.memory.dram.capacity
    if need > have:
        gib = 1 << 30
        raise Infeasible(
            "--model",
            f"{trace.model} does not fit: needs {need / gib:.2f} GiB (weights "
            f"{trace.weights_bytes / gib:.2f}, state {trace.state_bytes / gib:.2f}, activations "
            f"{trace.activation_bytes / gib:.2f}) but {hw.name} has {have / gib:.2f} GiB "
            "(memory.dram.capacity)")


def run_trace(hw: Hardware, trace: Trace, mapping: Mapping = "tensor",
              granularity: int = DEFAULT_GRANULARITY, record: bool = False,
              quant: str | None = None, links: Links | None = None, detail: bool = True,
              fit: bool = True) -> tuple[Result, list[Task], Timeline]:
    """Map and simulate a captured trace; also returns the tasks and timeline.

    Refused: a mapping the machine does not declare (`scheduling.mappings`), a granularity
    below 1, a model that does not fit (with `fit`; a training step's memory is its own
    model, simulator.training.memory), a matmul or attention dtype the machine has no rate
    for (named as the model's torch_dtype, or as the `quant` scheme that set it).
    """
    check_mapping(hw, mapping)
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
        raise UserError("--granularity",
                        f"expected a whole number of chunks ≥ 1, not {granularity!r}")
    if fit:
        check_fits(hw, trace)
    try:
        tasks = map_trace(trace, hw, mapping, granularity, links)
    except (UnratedDtype, UnsupportedPair) as exc:
        if quant is not None:
            raise UserError(f"--quant {quant}", exc.detail) from None
        if isinstance(exc, UnsupportedPair):
            raise UserError(f"--model {trace.model}", exc.detail) from None
        raise exc.for_model(trace.model) from None
    timeline = simulate_tasks(hw, tasks, trace.tokens * HOST_BYTES_PER_TOKEN, record)
    return build_result(hw, trace, tasks, timeline, energy(hw, tasks, timeline), mapping,
                        detail=detail), tasks, timeline


def simulate(hw: Hardware | str | Path, model: AnyModel | str, *, phase: Phase | None = None,
             batch: int = 1, context: int | None = None, prompt: int | None = None,
             mapping: Mapping = "tensor", hw_set: MappingType[str, Any] | None = None,
             model_set: MappingType[str, str] | None = None,
             granularity: int = DEFAULT_GRANULARITY, use_cache: bool = True,
             trace_file: str | Path | None = None, plot_dir: str | Path | None = None,
             runtime: Runtime | None = None, moe_routing: str | None = None,
             quant: str | None = None, tp: int = 1, pp: int = 1,
             micro_batches: int = 1, ep: int = 1, placement: str | Path | None = None,
             ep_mode: str = "combine", dp: int = 1, pp_interleave: int = 1,
             sp: int = 1, tp_overlap: int = 1, tp_sp: bool = False,
             derive: bool = False, detail: bool = True) -> Result:
    """Simulate one step of `model` on `hw`.

    decode (a causal LM's default): one new token for each of `batch` sequences after
    `context` tokens;
    prefill: `batch` prompts of `prompt` tokens (both by default 2048, or as many as the
    model's positions allow); forward (an encoder's default): one pass over `batch` inputs.
    `hw_set` overrides dotted YAML paths (values with units, e.g. {"clock": "54 MHz"});
    `model_set` overrides config fields; `moe_routing` is an MoE model's routing policy.
    `trace_file` receives a Chrome/Perfetto timeline of the run; `plot_dir` the per-layer
    breakdown and roofline PNGs. `runtime` (eager or cuda_graphs) replaces the host runtime
    the hardware file models (`overheads.runtime`); None keeps it. `quant` applies a
    quantization scheme to the blocks' linears (simulator.workload.quant). On a system
    (`hw` a system file), `tp`, `pp` and `micro_batches` spread the step over its devices
    (simulator.parallel; `pp_interleave` virtual stages per stage, `tp_overlap` query tiles
    whose all-reduces overlap compute, `tp_sp` Megatron's sequence parallelism in the TP
    group), `dp` replicates that
    over equal shares of the batch, `sp` splits each sequence (Ulysses; simulator.sequence),
    and `ep` spreads an MoE model's experts, placed by the
    `placement` file (default contiguous) under the `ep_mode` runtime (combine or coherent;
    simulator.experts). `derive`: the trace may be derived from captures of other shapes
    (simulator.workload.reshape), as a caller simulating many shapes of one model wants;
    without `detail` (one chip only) the result leaves out its layers and ops.
    """
    from simulator.hardware.system import load_machine
    from simulator.parallel import Parallelism, check, check_degrees, simulate_system

    system, machine = (None, hw) if isinstance(hw, Hardware) else load_machine(hw, hw_set)
    machine = with_runtime(machine, runtime)
    par = Parallelism(tp, pp, micro_batches, ep, None if placement is None else str(placement),
                      ep_mode, dp, pp_interleave, sp, tp_overlap,  # type: ignore[arg-type]
                      tp_sp)
    check_degrees(par)
    if isinstance(model, str):
        cfg = resolve_model(model, model_set, moe_routing)
    elif model_set or moe_routing is not None:
        raise UserError("--model-set" if model_set else "--moe-routing", "a model given as a "
                        "config object is used as it is; expected its fields set in it, or "
                        "the model by name")
    else:
        cfg = model
    phase, context, prompt = step_shape(cfg, phase, batch, context, prompt)
    if batch % dp:
        raise UserError("--dp", f"expected a divisor of --batch {batch} (each replica takes "
                                f"an equal share of the sequences), not {dp}")
    if batch // dp % micro_batches:
        raise UserError("--micro-batches", f"expected a divisor of a replica's batch "
                                           f"{batch // dp}, not {micro_batches}")
    trace = get_trace(cfg, phase, batch // dp // micro_batches, context, prompt,
                      use_cache=use_cache, derive=derive)
    if quant is not None:
        from simulator.workload.quant import quantize

        trace = quantize(trace, quant)
    check(par, system, trace)
    if system is not None:  # plots: one micro-batch's path, one device per stage
        result = simulate_system(system, machine, trace, par, mapping, granularity, quant,
                                 trace_file)
    else:
        result, _, timeline = run_trace(machine, trace, mapping, granularity,
                                        record=trace_file is not None, quant=quant,
                                        detail=detail or plot_dir is not None)
        if trace_file is not None:
            from simulator.files import write_atomic
            from simulator.timeline import to_json

            write_atomic(trace_file, to_json(machine, trace, timeline), "--trace")
    if plot_dir is not None:
        from simulator.plots import save_result_plots

        try:
            save_result_plots(result, machine, plot_dir)
        except OSError as exc:
            raise UserError(f"--plot {plot_dir}", f"cannot write there ({exc.strerror})") from None
    return result


def with_runtime(hw: Hardware, runtime: str | None) -> Hardware:
    """`hw` launching its kernels under `runtime` (None: the one its file names)."""
    if runtime is None or runtime == hw.overheads.runtime:
        return hw
    if runtime not in get_args(Runtime):
        raise UserError("--runtime", f"expected one of {', '.join(get_args(Runtime))}, "
                        f"not {runtime!r}")
    if runtime not in hw.overheads.runtimes():
        have = hw.overheads.runtime
        why = (f"declares only {have} (overheads.graph_launch is not set)" if have else
               "declares no host runtime (overheads.runtime): its ops are not CUDA kernels")
        raise UserError("--runtime", f"{runtime} is not available on {hw.name}, which {why}")
    overheads = hw.overheads.model_copy(update={"runtime": runtime})
    return hw.model_copy(update={"overheads": overheads})
