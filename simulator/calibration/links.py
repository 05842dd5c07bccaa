"""Fit link efficiencies on the collectives `system-measurements.md` gives for fitting.

    python -m simulator.calibration.links

At large messages a ring collective's busbw is the link rate × efficiency (latency is
negligible there), so each fit is one ratio, solved through the event simulation (not the
closed form) by rescaling until the simulated busbw meets the measured one:

- dgx_a100.yaml `links.0.efficiency` on N2: 8 × A100 SXM4, all_reduce busbw ≈ 200 GB/s at
  1 GiB. Held out: N3, an NVLink pair (2 GPUs) at 208 GB/s.
- dgx_h100.yaml `links.0.efficiency` on N1: 8 × H100 SXM, ring collectives ≈ 370 GB/s
  busbw at large messages (NVLS's 480 GB/s is not modelled).
"""

from __future__ import annotations

from simulator.collective import run_collective
from simulator.hardware.system import load_system

#: (system file, collective, bytes, devices, measured busbw B/s, the row it comes from)
FITS = (("dgx_a100.yaml", "allreduce", 1 << 30, 8, 200e9, "N2"),
        ("dgx_h100.yaml", "allreduce", 1 << 30, 8, 370e9, "N1"))
#: held out: (system file, collective, bytes, devices, measured busbw B/s, row)
HELD_OUT = (("dgx_a100.yaml", "allreduce", 12 << 30, 2, 208e9, "N3"),)


def fit_efficiency(name: str, kind: str, nbytes: int, devices: int, busbw: float) -> float:
    """The link efficiency at which the simulated busbw equals `busbw`."""
    shipped, _ = load_system(name)
    efficiency = 1.0
    for _ in range(4):  # busbw ∝ efficiency up to the latency terms: converges at once
        level = shipped.links[0].model_copy(update={"efficiency": efficiency})
        system = shipped.model_copy(update={"links": (level, *shipped.links[1:])})
        got = run_collective(system, kind, nbytes, devices).busbw_bytes_per_s
        efficiency = min(1.0, efficiency * busbw / got)
    return efficiency


def main() -> None:
    for name, kind, nbytes, devices, busbw, row in FITS:
        value = fit_efficiency(name, kind, nbytes, devices, busbw)
        print(f"{name}: links.0.efficiency: {value:.4f}   # FITTED on {row}")
    for name, kind, nbytes, devices, busbw, row in HELD_OUT:
        system, _ = load_system(name)
        got = run_collective(system, kind, nbytes, devices).busbw_bytes_per_s
        print(f"held out {row} {name} {kind} n={devices}: {got / 1e9:.1f} GB/s vs "
              f"{busbw / 1e9:.0f} ({got / busbw - 1:+.1%})")


if __name__ == "__main__":
    main()
