"""The human-readable rendering of a Result and of one kernel (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from simulator.report import Result, SystemShare

if TYPE_CHECKING:
    from simulator.oprun import KernelResult
    from simulator.training import TrainingResult


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"),
                           (1, ""), (1e-3, "m"), (1e-6, "µ"), (1e-9, "n")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {prefix}{unit}"
    return f"{value:.4g} {unit}"


def _bytes(value: float) -> str:
    for factor, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value:.0f} B"


def _runtime(runtime: str | None) -> str:
    return {"eager": "eager (a CPU launch before every kernel)",
            "cuda_graphs": "cuda_graphs (one graph launch per step)"}.get(
        runtime or "", "none (ops issued on the device)")


def _shares(shares: dict[str, float]) -> str:
    return "  ".join(f"{track} {share:.1%}" for track, share in shares.items())


def _rate(tokens_per_s: float, what: str = "tokens") -> str:
    return (f"{tokens_per_s:,.0f}" if tokens_per_s >= 1e4 else f"{tokens_per_s:.4g}") + (
        f" {what}/s")


def _timing(result: Result) -> list[tuple[str, str]]:
    """Latency and throughput rows, each naming what it covers: at batch B a decode step
    makes B tokens (one per sequence) and a prefill runs all B prompts."""
    batch, latency = result.batch, _si(result.latency_s, "s")
    if result.phase == "forward":  # an encoder's pass over a batch of inputs (images)
        return [(f"forward latency ({batch} input{'s' if batch > 1 else ''})", latency),
                ("throughput", _rate(result.tokens_per_s, "inputs"))]
    if result.phase == "decode":
        rows = [("latency per token (decode step)" if batch == 1
                 else f"step latency ({batch} tokens)", latency)]
        unit = "sequence"
    else:
        prompts = f"{result.prompt}" if batch == 1 else f"{batch} × {result.prompt}"
        per_token = "" if batch == 1 else f" (÷ {result.tokens})"
        rows = [(f"prefill latency ({prompts} tokens)", latency),
                (f"time per prompt token{per_token}", _si(result.latency_s / result.tokens, "s"))]
        unit = "prompt"
    if batch == 1:
        return [*rows, ("throughput", _rate(result.tokens_per_s))]
    return [*rows, (f"throughput, {batch} {unit}s", _rate(result.tokens_per_s)),
            (f"throughput per {unit}", _rate(result.tokens_per_s / batch))]


def render(result: Result, console: Console | None = None) -> None:
    """Print the summary, memory footprint and per-layer breakdown."""
    console = console or Console()
    shape = {"decode": f"batch {result.batch}, context {result.context}",
             "prefill": f"batch {result.batch}, prompt {result.prompt}"}.get(
        result.phase, f"batch {result.batch}")
    summary = Table(title=f"{result.model} on {result.hardware}", box=box.SIMPLE_HEAD,
                    show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    rows = [
        ("phase", f"{result.phase} ({shape})"),
        ("mapping", f"{result.mapping} split over the cores"),
        ("runtime", _runtime(result.runtime)),
        *_timing(result),
        ("average power", _si(result.power_w, "W")),
        ("energy per input" if result.phase == "forward" else "energy per token",
         _si(result.energy_per_token_j, "J")),
        ("memory footprint", _bytes(result.memory_bytes)),
        ("  weights", _bytes(result.weights_bytes)),
        ("  state (KV cache / recurrent)", _bytes(result.state_bytes)),
        ("  activations (peak)", _bytes(result.activation_bytes)),
        ("DRAM traffic", _bytes(result.dram_bytes)),
        ("host → device input", _si(result.host_transfer_s, "s")),
        # time held (a narrow access holds a whole burst) and useful bytes over bandwidth
        ("channel time busy", _shares(result.channel_utilisation)),
        ("  useful bytes / bandwidth", _shares(result.channel_useful_utilisation)),
    ]
    if result.expert_imbalance is not None:
        rows.append(("expert load (busiest / ⌈mean⌉)", f"{result.expert_imbalance:.2f}"))
    if result.system is not None:
        rows += _system_rows(result.system)
    for name, value in rows:
        summary.add_row(name, value)
    console.print(summary)
    layers = Table(title="per layer", box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("layer", "latency", "share", "energy"):
        layers.add_column(column, justify="left" if column == "layer" else "right")
    for layer in result.layers:
        share = layer.latency_s / result.latency_s if result.latency_s else 0.0
        layers.add_row(layer.name, _si(layer.latency_s, "s"), f"{share:.1%}",
                       _si(layer.energy_j, "J"))
    console.print(layers)
    for note in result.notes:
        console.print(f"note: {note}")


def _system_rows(share: SystemShare) -> list[tuple[str, str]]:
    """How a system run was spread: degrees, one device's memory, links and bubbles."""
    stages = ", ".join(_si(t, "s") for t in share.stage_latency_s)
    return [
        ("devices", f"{share.devices} of {share.system}: "
                    + (f"dp {share.dp} × " if share.dp > 1 else "") + f"tp {share.tp} × "
                    + (f"sp {share.sp} × " if share.sp > 1 else "")
                    + (f"ep {share.ep} ({share.ep_mode}) × " if share.ep > 1 else "")
                    + f"pp {share.pp}"
                    + (f" ({share.interleave} virtual stages each)" if share.interleave > 1
                       else "") + f", {share.micro_batches} micro-batch(es)"),
        ("per device", f"{_bytes(share.device_memory_bytes)} (weights "
                       f"{_bytes(share.device_weights_bytes)}, state "
                       f"{_bytes(share.device_state_bytes)})"),
        ("stage time per micro-batch", stages),
        ("pipeline bubbles", f"{share.bubble_fraction:.1%}"),
        ("communication (one micro-batch's path)",
         f"{_si(share.communication_s, 's')} ({share.communication_share:.1%})"),
        *((f"  stage {c.stage}: {c.count} × {c.collective}", f"{_bytes(c.bytes)} each, "
           f"{_si(c.time_s, 's')}") for c in share.collectives),
    ]


_MODES = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward + backward"}


def _kernel_shape(shape: dict[str, int | str]) -> str:
    """A GEMM as M × N × K, attention as B(atch) × H(eads) × S(equence) × D (head size)."""
    if {"m", "n", "k"} <= shape.keys():
        text = f"M {shape['m']} × N {shape['n']} × K {shape['k']}"
        return text + (f", batch {shape['batch']}" if shape.get("batch", 1) != 1 else "")
    if {"heads", "q_len", "head_dim"} <= shape.keys():
        seq = (f"S {shape['q_len']}" if shape["q_len"] == shape.get("kv_len", shape["q_len"])
               else f"Sq {shape['q_len']} × Skv {shape['kv_len']}")
        return (f"B {shape.get('batch', 1)} × H {shape['heads']} × {seq} × D {shape['head_dim']}"
                f", {'causal' if shape.get('causal') else 'not causal'}")
    return ", ".join(f"{key} {value}" for key, value in shape.items())


def _kernel_name(result: KernelResult) -> tuple[str, str]:
    """(what ran, how its FLOPs are counted)."""
    if result.kernel == "attention":
        mode = str(result.shape.get("mode", "fwd"))
        return f"attention ({_MODES.get(mode, mode)})", "FA-2 count"
    if result.kernel == "gemm":
        return "gemm (C = A·B)", "2·M·N·K"
    return result.kernel, "as traced"


def render_kernel(result: KernelResult, console: Console | None = None,
                  dtype: str | None = None) -> None:
    """Print one kernel's latency, work, rate, DRAM traffic and arithmetic intensity."""
    console = console or Console()
    table = Table(title=f"{result.kernel} on {result.hardware}", box=box.SIMPLE_HEAD,
                  show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    intensity = (f"{result.flops / result.bytes_moved:.4g} FLOP/byte" if result.bytes_moved
                 else "no DRAM traffic")
    kernel, counted = _kernel_name(result)
    rows = [
        ("kernel", kernel),
        ("shape", _kernel_shape(result.shape)),
        *([("dtype", dtype)] if dtype else []),
        ("hardware", result.hardware),
        ("latency", _si(result.latency_s, "s")),
        (f"FLOPs ({counted})", _si(result.flops, "FLOP")),
        ("throughput", _si(result.tflops * 1e12, "FLOP/s")),
        ("bytes from DRAM", _bytes(result.bytes_moved)),
        ("arithmetic intensity", intensity),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def render_training(result: TrainingResult, console: Console | None = None) -> None:
    """Print a training step's time, throughput, MFU, memory per device and breakdown."""
    console = console or Console()
    table = Table(title=f"{result.model} training on {result.hardware}", box=box.SIMPLE_HEAD,
                  show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    micro = (f", micro-batch {result.micro_batch} × {result.micro_batches}"
             if result.micro_batches > 1 else "")
    rows = [
        ("phase", f"train (batch {result.batch} × {result.seq_len} tokens{micro})"),
        *([("data parallel", f"{result.dp} replicas, ZeRO stage {result.zero}")]
          if result.dp > 1 else []),
        *([("tensor parallel", f"{result.tp} devices per replica")] if result.tp > 1 else []),
        *([("sequence parallel", f"{result.sp} devices per replica (Ulysses)")]
          if result.sp > 1 else []),
        *([("FPDT", f"{result.fpdt_chunks} chunks of "
                    f"{result.seq_len // result.fpdt_chunks} tokens per sequence")]
          if result.fpdt_chunks > 1 else []),
        *([("pipeline", f"{result.pp} stages, "
                        + (f"interleaved 1F1B ({result.pp_interleave} chunks each)"
                           if result.pp_interleave > 1 else "1F1B")
                        + f", bubble {result.bubble_fraction:.1%}")]
          if result.pp > 1 else []),
        ("recompute / optimizer", f"{result.recompute} / {result.optimizer} (fp32 master)"),
        ("step time", _si(result.step_time_s, "s")),
        ("throughput", _rate(result.tokens_per_s)),
        ("model TFLOP/s per GPU", f"{result.model_tflops_per_gpu:.1f}"),
        ("MFU / HFU", f"{result.mfu:.1%} / {result.hfu:.1%}"),
        ("average power", _si(result.power_w, "W")),
        ("energy per token", _si(result.energy_per_token_j, "J")),
        ("peak memory (largest device)", _bytes(result.peak_memory_bytes)),
    ]
    groups: dict[tuple, list[str]] = {}  # identical replicas shown once
    for device in result.devices:
        key = (device.peak_memory_bytes, device.capacity_bytes, device.peak_time_s,
               tuple(device.at_peak_bytes.items()))
        groups.setdefault(key, []).append(device.device)
    for (peak, capacity, when, held), names in groups.items():
        label = names[0] if len(names) == 1 else f"each of {len(names)} devices"
        rows.append((f"  {label}", f"{_bytes(peak)} of {_bytes(capacity)} at "
                     f"{_si(when, 's')}"))
        rows += [(f"    {name}", _bytes(size)) for name, size in held]
    rows.append(("time by stage", ""))
    rows += [(f"  {stage}", f"{_si(seconds, 's')} ({seconds / result.step_time_s:.1%})")
             for stage, seconds in result.stage_time_s.items() if seconds]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"[dim]{escape(result.flops_formula)}[/dim]")
    if result.out_of_memory:
        console.print(f"[bold red]{result.out_of_memory}[/bold red]")
