"""Figures: per-layer breakdown, per-op roofline, tokens/s-against-watts Pareto front.

Each function draws on a matplotlib Axes (for notebooks) and `save_*` writes a PNG
(atomically) for the CLI's `--plot DIR`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd

from simulator.hardware.schema import Hardware
from simulator.report import Result

#: One colour per op kind, the same in every roofline (roof lines are drawn in black).
KIND_COLOURS = {
    "matmul": "tab:blue", "ternary_matmul": "tab:cyan", "attention": "tab:red",
    "norm": "tab:green", "recurrence": "tab:purple", "softmax": "tab:orange",
    "reduction": "tab:brown", "activation": "tab:pink", "elementwise": "tab:olive",
    "embedding": "gold", "memory": "tab:gray"}
#: Marker of the 1st, 2nd, … result drawn on the same Axes (machines told apart).
MARKERS = ("o", "^", "s", "D", "v", "P")
ROOF_STYLES = ("-", "--", ":", "-.")


def pyplot() -> Any:
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write `fig` to `path` as a PNG atomically (its folder made) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return path


def layer_breakdown(result: Result, ax: Any) -> None:
    """Per-layer latency, stacked by the op kinds that took it (busy time, scaled)."""
    ops = result.ops_frame()
    busy = ops.groupby(["layer", "kind"])["latency_s"].sum().unstack(fill_value=0.0)
    order = [layer.name for layer in result.layers]
    busy = busy.reindex(order).fillna(0.0)
    latency = pd.Series({layer.name: layer.latency_s for layer in result.layers})
    shares = busy.div(busy.sum(axis=1).where(lambda s: s > 0, 1.0), axis=0)
    (shares.mul(latency, axis=0) * 1e3).plot.bar(stacked=True, ax=ax, width=0.85)
    ax.set(ylabel="latency (ms)", xlabel="", title=f"{result.model} on {result.hardware}: "
           f"{result.latency_s * 1e3:.4g} ms per step")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _kind_order(kind: str) -> tuple[int, str]:
    order = list(KIND_COLOURS)
    return (order.index(kind) if kind in order else len(order), kind)


def _scatter_kinds(result: Result, ax: Any, label: str | None) -> None:
    """The ops as points coloured by kind; a second result on the same Axes gets the next
    marker, and `label` (if given) follows each kind in the legend."""
    ops = result.ops_frame()
    ops = ops[(ops.latency_s > 0) & (ops.dram_bytes > 0)]
    drawn = {c.get_gid() for c in ax.collections if str(c.get_gid()).startswith("roofline:")}
    marker = MARKERS[len(drawn) % len(MARKERS)]
    gid = f"roofline:{len(drawn)}"
    for kind in sorted(set(ops.kind), key=_kind_order):
        points = ops[ops.kind == kind]
        ax.scatter(points.ops / points.dram_bytes, points.ops / points.latency_s, s=10,
                   alpha=0.7, marker=marker, color=KIND_COLOURS.get(kind, "black"),
                   label=f"{kind}, {label}" if label else kind, gid=gid)


def roofline(result: Result, hw: Hardware, ax: Any, label: str | None = None) -> None:
    """Every op at (operations per DRAM byte, operations per second), coloured by op kind,
    under the roofs (black lines: memory roof × peak of each unit)."""
    _scatter_kinds(result, ax, label)
    dram = hw.memory.dram
    ports = hw.cores.count * dram.access_width / 8 / dram.access_interval.ns(hw.core_clock) * 1e9
    # the memory roof: the DRAM channels, or every core's port where those are narrower
    bandwidth = min(dram.bandwidth_per_channel * dram.channels * dram.efficiency, ports)
    for index, (name, unit) in enumerate(hw.cores.units.items()):
        dtype = next((d for d in ("bf16", "ternary", "fp32") if d in unit.ops_per_cycle),
                     max(unit.ops_per_cycle, key=unit.ops_per_cycle.__getitem__))
        peak = unit.ops_per_cycle[dtype] * hw.cores.count * hw.core_clock
        knee = peak / bandwidth
        ax.plot([knee / 1e3, knee, knee * 1e3], [bandwidth * knee / 1e3, peak, peak], lw=0.8,
                color="black", ls=ROOF_STYLES[index % len(ROOF_STYLES)],
                label=f"roof: {name} ({dtype})" + (f", {label}" if label else ""))
    ax.set(xscale="log", yscale="log", xlabel="operations per DRAM byte",
           ylabel="operations per second", title=f"roofline of {result.model} on {hw.name}"
           if label is None else "roofline (black lines: memory roof × peak of each unit)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def pareto_front(frame: pd.DataFrame, ax: Any, group: str = "hardware") -> None:
    """tokens/s against watts for every feasible point; the front (most tokens/s for the
    watts) drawn as a line per group."""
    ok = frame[frame.status == "ok"]
    for name, points in ok.groupby(group):
        ax.scatter(points.power_w, points.tokens_per_s, s=12, alpha=0.5, label=str(name))
        front = points.sort_values("power_w")
        front = front[front.tokens_per_s >= front.tokens_per_s.cummax()]
        ax.plot(front.power_w, front.tokens_per_s, lw=1)
    ax.set(xlabel="average power (W)", ylabel="tokens/s", yscale="log",
           title="Pareto front: tokens/s against watts")
    ax.legend(fontsize=7)


def save_result_plots(result: Result, hw: Hardware, folder: str | Path) -> list[Path]:
    plt = pyplot()
    folder = Path(folder)
    fig, ax = plt.subplots(figsize=(max(6, len(result.layers) * 0.35), 4))
    layer_breakdown(result, ax)
    paths = [save_figure(fig, folder / "layers.png")]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    roofline(result, hw, ax)
    paths.append(save_figure(fig, folder / "roofline.png"))
    return paths


def save_pareto(frame: pd.DataFrame, folder: str | Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pareto_front(frame, ax)
    return save_figure(fig, Path(folder) / "pareto.png")
