"""The human-readable rendering of a Result (rich)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from simulator.report import Result


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""), (1e-3, "m"),
                           (1e-6, "µ"), (1e-9, "n")):
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


def render(result: Result, console: Console | None = None) -> None:
    """Print the summary, memory footprint and per-layer breakdown."""
    console = console or Console()
    step = ("one decode step" if result.phase == "decode" else f"prefill of {result.prompt}")
    shape = (f"batch {result.batch}, context {result.context}" if result.phase == "decode"
             else f"batch {result.batch}, prompt {result.prompt}")
    summary = Table(title=f"{result.model} on {result.hardware}", box=box.SIMPLE_HEAD,
                    show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    rows = [
        ("phase", f"{result.phase} ({shape})"),
        ("mapping", f"{result.mapping} split over the cores"),
        ("runtime", _runtime(result.runtime)),
        (f"latency ({step})", _si(result.latency_s, "s")),
        ("latency per token" if result.phase == "decode" else "time per prompt token",
         _si(result.latency_s / (1 if result.phase == "decode" else result.prompt), "s")),
        ("throughput", f"{result.tokens_per_s:.4g} tokens/s"),
        ("average power", _si(result.power_w, "W")),
        ("energy per token", _si(result.energy_per_token_j, "J")),
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
