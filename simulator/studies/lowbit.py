"""Low-bit GEMM/GEMV sweeps: what W8A8, W4A16, W4A4 and W2A8 buy against fp16, by M.

    python -m simulator.studies.lowbit --out reports/

For each machine (A100 SXM, A100 PCIe: the BitBLAS logs' card, H100 SXM) and weight
(N × K = 4096 × 4096, 8192 × 28672, and 28672 × 8192, the shape most BitBLAS fits are on),
the TFLOP/s (2·M·N·K over the latency, launch gap included as a model run would) and the
effective weight bandwidth (stored weight bytes over the latency) of each scheme's kernel
from M = 1 to 8192, written to `lowbit.csv`, `lowbit_tflops.png` and `lowbit_gbps.png`. The
measured BitBLAS points of the validation data are drawn on the PCIe panels: filled where
the calibration fitted them, hollow where they are held out. A pair a machine has no
kernel for (W4A4 on the H100: no int4 tensor cores) is left out of its panel.
"""

from __future__ import annotations

from pathlib import Path

from simulator.errors import UserError
from simulator.hardware import load_hardware
from simulator.oprun import gemm_op, run_op
from simulator.studies import out_folder, write_csv
from simulator.validation.cases import load_cases, shipped_case_files

MACHINES = ("gpu_a100.yaml", "gpu_a100_pcie.yaml", "gpu_h100.yaml")
#: Weights as N × K (the BitBLAS logs' convention).
WEIGHTS = ((4096, 4096), (8192, 28672), (28672, 8192))
M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
#: (label, activation dtype, weight dtype)
SCHEMES = (("fp16", "fp16", "fp16"), ("W8A8", "int8", "int8"), ("W4A16", "fp16", "int4"),
           ("W4A4", "int4", "int4"), ("W2A8", "int8", "int2"))
MEASURED_ON = "gpu_a100_pcie.yaml"


def sweep() -> list[dict[str, object]]:
    """Every machine × weight × scheme × M the machine runs: latency, TFLOP/s, weight GB/s."""
    rows: list[dict[str, object]] = []
    for name in MACHINES:
        hw = load_hardware(name)
        for n, k in WEIGHTS:
            for label, act, weight in SCHEMES:
                for m in M_VALUES:
                    op = gemm_op(m, n, k, act, 1, weight)
                    try:
                        result = run_op(hw, op)
                    except UserError:  # the machine has no kernel for this pair
                        break
                    rows.append({"hardware": name, "scheme": label, "m": m, "n": n, "k": k,
                                 "latency_s": result.latency_s, "tflops": result.tflops,
                                 "weight_gbps": op.weight_bytes / result.latency_s * 1e-9})
    return rows


def measured() -> list[dict[str, object]]:
    """The BitBLAS GEMM/GEMV cases (latency) of the shipped validation data that were fitted
    or held out (open and report cases are left off the plot)."""
    labels = {(act, weight): label for label, act, weight in SCHEMES}
    points = []
    for path in shipped_case_files():
        for case in load_cases(path):
            kernel = case.kernel
            if (kernel is None or kernel.type != "gemm" or case.metric != "latency_s"
                    or case.hardware != MEASURED_ON or case.role not in ("fitted", "held-out")):
                continue
            label = labels.get((kernel.dtype, kernel.weight_dtype or kernel.dtype))
            if label is None:
                continue
            points.append({"scheme": label, "m": kernel.m, "n": kernel.n, "k": kernel.k,
                           "role": case.role,
                           "tflops": 2 * kernel.m * kernel.n * kernel.k / case.reference * 1e-12})
    return points


def plot(rows: list[dict[str, object]], points: list[dict[str, object]], metric: str,
         path: Path) -> None:
    from simulator.plots import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(len(WEIGHTS), len(MACHINES), figsize=(15, 11), squeeze=False)
    colours = dict(zip([s[0] for s in SCHEMES], plt.rcParams["axes.prop_cycle"].by_key()["color"],
                       strict=False))
    for col, name in enumerate(MACHINES):
        for row, (n, k) in enumerate(WEIGHTS):
            ax = axes[row][col]
            for label, _, _ in SCHEMES:
                line = [r for r in rows if r["hardware"] == name and r["scheme"] == label
                        and (r["n"], r["k"]) == (n, k)]
                if line:
                    ax.plot([r["m"] for r in line], [r[metric] for r in line], "o-", ms=3,
                            color=colours[label], label=label)
            if name == MEASURED_ON and metric == "tflops":
                for point in points:
                    if (point["n"], point["k"]) != (n, k):
                        continue
                    fitted = point["role"] == "fitted"
                    ax.plot(point["m"], point["tflops"], "D", ms=8, color=colours[point["scheme"]],
                            mfc=colours[point["scheme"]] if fitted else "none",
                            label=f"BitBLAS {point['scheme']} ({point['role']})")
            ax.set(xscale="log", yscale="log", title=f"{name}: weight {n}×{k}", xlabel="M")
            ax.set_ylabel("TFLOP/s" if metric == "tflops" else "weight GB/s")
            ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    out = out_folder(__doc__)
    rows = sweep()
    points = measured()
    write_csv(out / "lowbit.csv", rows)
    plot(rows, points, "tflops", out / "lowbit_tflops.png")
    plot(rows, points, "weight_gbps", out / "lowbit_gbps.png")
    print(f"{len(rows)} points written to {out / 'lowbit.csv'}, lowbit_tflops.png and "
          "lowbit_gbps.png")


if __name__ == "__main__":
    main()
