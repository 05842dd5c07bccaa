"""GEMM and GEMV sweeps on the GPU models, written as a CSV table and a PNG figure.

    python -m simulator.studies.gemm --out reports/

Square bf16 GEMMs from 256 to 16384 (TFLOP/s against size: low at small sizes from wave
quantisation and launch overhead, saturating below the achievable peak) and decode-
shaped GEMVs, M = 1…16 against a 4096 × 4096 and an 8192 × 8192 weight (the share of
HBM bandwidth they reach).
"""

from __future__ import annotations

from pathlib import Path

from simulator.hardware import Hardware, load_hardware
from simulator.hardware.select import peak_flops
from simulator.oprun import gemm_op, run_op
from simulator.studies import out_folder, write_csv

MACHINES = ("gpu_a100.yaml", "gpu_h100.yaml")
SQUARE = tuple(int(256 * 2 ** (i / 2)) // 64 * 64 for i in range(13))  # 256 … 16384
GEMV_M = tuple(range(1, 17))
GEMV_NK = (4096, 8192)


def peak_tflops(hw: Hardware, dtype: str = "bf16") -> float:
    return peak_flops(hw, dtype) * 1e-12


def _row(hw: Hardware, kind: str, m: int, n: int, k: int) -> dict[str, object]:
    result = run_op(hw, gemm_op(m, n, k))
    hbm = hw.memory.dram.bandwidth_per_channel * hw.memory.dram.channels
    return {"hardware": hw.name, "kind": kind, "m": m, "n": n, "k": k,
            "latency_s": result.latency_s, "tflops": result.tflops,
            "peak_fraction": result.tflops / peak_tflops(hw),
            "hbm_fraction": result.bytes_moved / result.latency_s / hbm}


def sweep() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name in MACHINES:
        hw = load_hardware(name)
        rows += [_row(hw, "gemm", size, size, size) for size in SQUARE]
        rows += [_row(hw, "gemv", m, nk, nk) for nk in GEMV_NK for m in GEMV_M]
    return rows


def plot(rows: list[dict[str, object]], path: Path) -> None:
    from simulator.plots import pyplot, save_figure

    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in MACHINES:
        hw = load_hardware(name)
        gemm = [r for r in rows if r["hardware"] == hw.name and r["kind"] == "gemm"]
        line = left.plot([r["m"] for r in gemm], [r["tflops"] for r in gemm], "o-",
                         label=hw.name)[0]
        left.axhline(peak_tflops(hw), color=line.get_color(), ls=":", lw=1)
        for nk, style in zip(GEMV_NK, ("o-", "s--"), strict=True):
            gemv = [r for r in rows if r["hardware"] == hw.name and r["kind"] == "gemv"
                    and r["n"] == nk]
            right.plot([r["m"] for r in gemv], [r["hbm_fraction"] for r in gemv], style,
                       color=line.get_color(), label=f"{hw.name}, {nk}×{nk}")
    left.set(xscale="log", xlabel="M = N = K (bf16)", ylabel="TFLOP/s",
             title="square GEMM (dotted: peak)")
    left.legend(fontsize=8)
    right.set(xlabel="M (tokens)", ylabel="fraction of peak HBM bandwidth", ylim=(0, 1),
              title="decode-shaped GEMV (bf16 weights)")
    right.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    out = out_folder(__doc__)
    rows = sweep()
    write_csv(out / "gemm_tflops.csv", rows)
    plot(rows, out / "gemm_tflops.png")
    print(f"{len(rows)} points written to {out / 'gemm_tflops.csv'} and {out / 'gemm_tflops.png'}")


if __name__ == "__main__":
    main()
