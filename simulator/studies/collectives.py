"""All-reduce bus bandwidth against message size on the shipped systems, with the measured
collectives drawn on top.

    python -m simulator.studies.collectives --out reports/

A ring all-reduce of 1 KiB … 4 GiB (nccl-tests' sizes, ×2 apart) on the 8 GPUs of
dgx_a100.yaml and dgx_h100.yaml and on two GPUs of dgx_a100.yaml, written as
collectives.csv (latency, algbw, busbw) and collectives_busbw.png. Small messages are
latency-bound (2(n − 1) link latencies), large ones reach the link rate × efficiency. The
measured points are the validation cases of collectives.yaml: filled where a link
efficiency was fitted to them, hollow where held out.
"""

from __future__ import annotations

from pathlib import Path

from simulator.collective import run_collective
from simulator.hardware.system import load_system
from simulator.studies import out_folder, write_csv
from simulator.validation.cases import load_cases, shipped_case_files

#: (system file, devices) of each curve
CURVES = (("dgx_a100.yaml", 8), ("dgx_a100.yaml", 2), ("dgx_h100.yaml", 8))
SIZES = tuple(1 << bits for bits in range(10, 33))  # 1 KiB … 4 GiB


def sweep() -> list[dict[str, object]]:
    """One row per (curve, size)."""
    rows: list[dict[str, object]] = []
    for name, devices in CURVES:
        system, _ = load_system(name)
        for size in SIZES:
            result = run_collective(system, "allreduce", size, devices)
            rows.append({"system": name, "devices": devices, "bytes": size,
                         "latency_s": result.latency_s,
                         "algbw_bytes_per_s": result.algbw_bytes_per_s,
                         "busbw_bytes_per_s": result.busbw_bytes_per_s})
    return rows


def measured() -> list[dict[str, object]]:
    """The fitted and held-out all-reduce cases of the shipped validation data."""
    points = []
    for path in shipped_case_files():
        for case in load_cases(path):
            kernel = case.kernel
            if (kernel is None or kernel.type != "collective" or kernel.collective != "allreduce"
                    or case.role not in ("fitted", "held-out")):
                continue
            points.append({"system": case.hardware, "devices": kernel.devices,
                           "bytes": kernel.bytes, "role": case.role,
                           "busbw_bytes_per_s": case.reference})
    return points


def plot(rows: list[dict[str, object]], points: list[dict[str, object]], path: Path) -> None:
    from simulator.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for name, devices in CURVES:
        curve = [r for r in rows if r["system"] == name and r["devices"] == devices]
        (line,) = ax.plot([r["bytes"] for r in curve],
                          [float(r["busbw_bytes_per_s"]) * 1e-9 for r in curve],  # type: ignore[arg-type]
                          label=f"{name.removesuffix('.yaml')}, {devices} GPUs")
        colours[name, devices] = line.get_color()
    for point in points:
        colour = colours.get((point["system"], point["devices"]), "black")
        fitted = point["role"] == "fitted"
        ax.plot(point["bytes"], float(point["busbw_bytes_per_s"]) * 1e-9, "o",  # type: ignore[arg-type]
                color=colour, mfc=colour if fitted else "none",
                label=f"measured, {point['devices']} GPUs ({point['role']})")
    ax.set(xscale="log", xlabel="message size (bytes, nccl-tests size)",
           ylabel="all-reduce busbw (GB/s)", title="ring all-reduce: simulated vs measured")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    out = out_folder(__doc__)
    rows = sweep()
    write_csv(out / "collectives.csv", rows)
    plot(rows, measured(), out / "collectives_busbw.png")
    print(f"wrote {out / 'collectives.csv'} and {out / 'collectives_busbw.png'}")


if __name__ == "__main__":
    main()
