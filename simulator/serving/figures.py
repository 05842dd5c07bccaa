"""Serving figures: latency CDFs, and batch size and KV use over time (`--plot DIR`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from simulator.files import output_folder
from simulator.plots import pyplot, save_figure
from simulator.serving.loop import ServeResult

METRICS = ("ttft_s", "tpot_s", "e2e_s")


def latency_cdfs(runs: dict[str, ServeResult], axes: Any) -> None:
    """One CDF per run on each of three Axes: TTFT, TPOT and end-to-end latency."""
    for name, done in runs.items():
        for ax, metric in zip(axes, METRICS, strict=True):
            values = np.sort([float(row[metric]) for row in done.requests])
            if not len(values):
                continue
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=name)
    for ax, metric in zip(axes, METRICS, strict=True):
        ax.set_xlabel(metric.removesuffix("_s").upper() + " (s)")
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
        if runs:
            ax.legend(fontsize=8)


def over_time(done: ServeResult, batch_ax: Any, kv_ax: Any) -> None:
    """Sequences per step, and KV blocks in use (share of one replica's cache), against
    time, both 0 while a replica idles; one line per replica. Needs the run's step
    records."""
    blocks = done.summary["kv_blocks"]
    for replica in range(done.summary["replicas"]):
        times: list[float] = []
        batch: list[int] = []
        kv: list[float] = []
        steps = [s for s in done.steps if s.replica == replica]
        for step, later in zip(steps, [*steps[1:], None], strict=True):
            times.append(step.start_s)
            batch.append(step.sequences)
            kv.append(step.kv_blocks_used / blocks)
            if later is None or later.start_s > step.end_s:  # idle until the next step
                times.append(step.end_s)
                batch.append(0)
                kv.append(0.0)
        label = f"replica {replica}"
        batch_ax.step(times, batch, where="post", label=label)
        kv_ax.step(times, kv, where="post", label=label)
    batch_ax.set_ylabel("sequences in a step")
    kv_ax.set_ylabel("KV cache in use")
    kv_ax.set_xlabel("time (s)")
    for ax in (batch_ax, kv_ax):
        ax.grid(alpha=0.3)
    if done.summary["replicas"] > 1:
        batch_ax.legend(fontsize=8)


def save_serving_plots(done: ServeResult, folder: str | Path, title: str) -> list[Path]:
    """DIR/serving_cdf.png and DIR/serving_over_time.png for one run."""
    plt = pyplot()
    out = output_folder(folder, "--plot")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    latency_cdfs({done.summary["scheduler"]: done}, axes)
    fig.suptitle(title)
    fig.tight_layout()
    paths = [save_figure(fig, out / "serving_cdf.png")]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    over_time(done, top, bottom)
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "serving_over_time.png"))
    return paths


def rate_curve(frame: Any, throughput_ax: Any, latency_ax: Any) -> None:
    """A serving sweep's curve: output tokens/s and e2e / TTFT p99 against arrival rate,
    one line per (hardware, model, scheduler, replicas)."""
    ok = frame[frame.status == "ok"]
    for name, points in ok.groupby(["hardware", "model", "scheduler", "replicas"]):
        points = points.sort_values("rate_per_s")
        label = " · ".join(str(part) for part in name)
        throughput_ax.plot(points.rate_per_s, points.output_tokens_per_s, "o-", label=label)
        latency_ax.plot(points.rate_per_s, points.e2e_p99_s, "o-", label=f"{label} e2e")
        latency_ax.plot(points.rate_per_s, points.ttft_p99_s, "s--", label=f"{label} TTFT")
    throughput_ax.set(xlabel="arrival rate (requests/s)", ylabel="output tokens/s")
    latency_ax.set(xlabel="arrival rate (requests/s)", ylabel="p99 latency (s)", yscale="log")
    for ax in (throughput_ax, latency_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def save_rate_curve(frame: Any, folder: str | Path) -> Path:
    """DIR/serving_rate.png for a serving sweep."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rate_curve(frame, *axes)
    fig.tight_layout()
    return save_figure(fig, Path(folder) / "serving_rate.png")
