"""The memory timeline of a training step: device memory vs time, stacked by category,
and the same samples as CSV (`--plot DIR` writes memory_timeline.png and .csv)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simulator.errors import UserError
from simulator.files import write_atomic
from simulator.plots import pyplot, save_figure
from simulator.training.memory import GIB
from simulator.training.step import TrainingResult
from simulator.workload.training import CATEGORIES

COLOURS = {"weights": "tab:blue", "optimizer": "tab:purple", "gradients": "tab:orange",
           "activations": "tab:green", "workspace": "tab:gray"}


def memory_plot(result: TrainingResult, ax: Any) -> None:
    """Stacked memory by category over the step, the capacity and the peak marked."""
    assert result.timeline is not None
    samples = result.timeline.samples
    times = [s.time_s * 1e3 for s in samples]
    stacks = [[s.bytes[i] / GIB for s in samples] for i in range(len(CATEGORIES))]
    ax.stackplot(times, stacks, labels=CATEGORIES, step="pre",
                 colors=[COLOURS[c] for c in CATEGORIES])
    device = result.devices[0]
    capacity = device.capacity_bytes / GIB
    if device.peak_memory_bytes * 3 >= device.capacity_bytes:  # else it squashes the plot
        ax.axhline(capacity, color="black", linestyle="--", linewidth=1,
                   label=f"capacity {capacity:.1f} GiB")
    ax.plot([device.peak_time_s * 1e3], [device.peak_memory_bytes / GIB], "rv",
            label=f"peak {device.peak_memory_bytes / GIB:.2f} GiB")
    ax.set(xlabel="time in the step (ms)", ylabel="device memory (GiB)",
           title=f"{result.model} training on {result.hardware}: batch {result.batch} × "
                 f"{result.seq_len} tokens, {result.micro_batches} micro-batch(es), "
                 f"recompute {result.recompute}")
    ax.legend(loc="upper left", fontsize=8,
              title=None if device.peak_memory_bytes * 3 >= device.capacity_bytes
              else f"capacity {capacity:.1f} GiB (off scale)", title_fontsize=8)


def saved_plot(result: TrainingResult, ax: Any) -> None:
    """Per layer: the activations its forward keeps for the backward."""
    names = list(result.saved_activation_bytes)
    ax.bar(range(len(names)), [result.saved_activation_bytes[n] / GIB for n in names],
           color=COLOURS["activations"])
    step = max(1, len(names) // 16)
    ax.set_xticks(range(0, len(names), step), names[::step], rotation=45, ha="right",
                  fontsize=7)
    ax.set(ylabel="kept for the backward (GiB)",
           title="activations each layer keeps (one micro-batch)")


def timeline_csv(result: TrainingResult) -> str:
    assert result.timeline is not None
    rows = [",".join(["time_s", *(f"{c}_bytes" for c in CATEGORIES), "total_bytes"])]
    rows += [",".join([repr(s.time_s), *map(str, s.bytes), str(s.total)])
             for s in result.timeline.samples]
    return "\n".join(rows) + "\n"


def save_memory_plot(result: TrainingResult, folder: str | Path) -> list[Path]:
    """Write memory_timeline.png and memory_timeline.csv into `folder`."""
    plt = pyplot()
    fig, (ax, per_layer) = plt.subplots(2, 1, figsize=(10, 8), height_ratios=(3, 2))
    memory_plot(result, ax)
    saved_plot(result, per_layer)
    fig.tight_layout()
    root = Path(folder)
    try:
        png = save_figure(fig, root / "memory_timeline.png")
        csv = root / "memory_timeline.csv"
        write_atomic(csv, timeline_csv(result), "--plot")
    except OSError as exc:
        raise UserError(f"--plot {folder}", f"cannot write there ({exc.strerror})") from None
    return [png, csv]
