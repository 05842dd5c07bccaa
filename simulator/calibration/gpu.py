"""Fit the GPU mechanisms on the measured kernels given for calibration (fitted cases only).

    python -m simulator.calibration.gpu [--write]

Three least-squares fits over the "fitted" cases of `gpu_kernels.yaml`, each after the last:
1. HBM (A100 80GB STREAM sweep: read/scale/triad and saturated init, 2/3 of the points):
   `memory.dram.latency` (unloaded), `queue_bandwidth` (the loaded latency's growth),
   `efficiency` and `turnaround` (the cost of mixing reads and writes);
2. tiles (A100 80GB PCIe: the best dense matmul G1b and the BitBLAS W4A16 GEMM
   4096×28672×8192, whose fp16 MMA hides the unpacking): `tensor.tile_overhead` and the
   card's `power.sustained_clock`; then `tensor.unpack.int4` on the W4A16 GEMVs 8192×8192
   and 28672×8192, `tensor.unpack.int2` on the W2A8 ones, `tensor.dtype_efficiency.int8`
   (empirical: no mechanism here explains why integer MMA main loops fall short of their
   rated rate) on 2 of the 4 W2A8 GEMMs and `dtype_efficiency.int4` on the longest W4A4 GEMM
   (its shape assumed, see the cases); the other points are held out (at least a third of
   each kernel's gated points) or, with their reason, open;
3. the sustained clocks of the A100 SXM (G1) and the H100 SXM (G2), one point each, and
   the H200's `memory.dram.efficiency` on its streaming bandwidth (M3).
The A100 40GB and SXM take the PCIe card's tile, unpack and MMA-rate values (one GA100);
the H100 the tile and unpack costs (same SM pipeline costs in cycles, assumed), not the MMA
rates. Then refit FlashAttention-2 (simulator.calibration.flash), whose kernel now runs at
the power-limited clock.
"""

from __future__ import annotations

import sys

from simulator.calibration.fit import Parameter, fit, number, publish, shipped_cases
from simulator.validation.cases import Case

CASES = "gpu_kernels.yaml"
HBM = [
    Parameter("memory.dram.latency", "ns", 600.0, 10.0, 50.0, 5000.0),
    Parameter("memory.dram.queue_bandwidth", "GB/s", 4000.0, 100.0, 200.0, 1e6),
    Parameter("memory.dram.efficiency", "", 0.9, 0.01, 0.3, 1.0),
    Parameter("memory.dram.turnaround", "", 0.08, 0.01, 0.0, 4.0),
]
TILES = [
    Parameter("cores.units.tensor.tile_overhead", "cycle", 500.0, 50.0, 0.0, 1e5),
    Parameter("power.sustained_clock", "MHz", 1300.0, 10.0, 500.0, 1410.0),
]
UNPACK_INT4 = [Parameter("cores.units.tensor.unpack.int4", "", 1.0, 0.1, 0.0, 64.0)]
UNPACK_INT2 = [Parameter("cores.units.tensor.unpack.int2", "", 1.0, 0.1, 0.0, 64.0)]
INT8 = [Parameter("cores.units.tensor.dtype_efficiency.int8", "", 0.8, 0.01, 0.1, 1.0)]
INT4 = [Parameter("cores.units.tensor.dtype_efficiency.int4", "", 0.8, 0.01, 0.1, 1.0)]
SXM_CLOCK = [Parameter("power.sustained_clock", "MHz", 1300.0, 10.0, 500.0, 1410.0)]
H100_CLOCK = [Parameter("power.sustained_clock", "MHz", 1500.0, 10.0, 500.0, 1830.0)]
H200_HBM = [Parameter("memory.dram.efficiency", "", 0.8, 0.01, 0.3, 1.0)]


def _fitted(prefixes: tuple[str, ...]) -> list[Case]:
    return [case for case in shipped_cases(CASES).values()
            if case.role == "fitted" and case.id.startswith(prefixes)]


def _texts(parameters: list[Parameter], values: list[float]) -> dict[str, str]:
    return {p.path: number(v) + (f" {p.unit}" if p.unit else "")
            for p, v in zip(parameters, values, strict=True)}


def calibrate() -> dict[str, dict[str, str]]:
    """The fitted values of every GPU file, as written in YAML."""
    hbm = _texts(HBM, fit(_fitted(("stream-",)), HBM))
    tiles = _texts(TILES, fit(_fitted(("g1b-", "bitblas-w4a16-gemm-")), TILES, fixed=hbm))
    known = {**hbm, **tiles}
    int4 = _texts(UNPACK_INT4, fit(_fitted(("bitblas-w4a16-gemv-",)), UNPACK_INT4, fixed=known))
    int2 = _texts(UNPACK_INT2, fit(_fitted(("bitblas-w2a8-gemv-",)), UNPACK_INT2,
                                   fixed={**known, **int4}))
    int8 = _texts(INT8, fit(_fitted(("bitblas-w2a8-gemm-",)), INT8,
                            fixed={**known, **int4, **int2}))
    mma4 = _texts(INT4, fit(_fitted(("bitblas-w4a4-",)), INT4,
                            fixed={**known, **int4, **int2, **int8}))
    pipeline = {"cores.units.tensor.tile_overhead": tiles["cores.units.tensor.tile_overhead"],
                **int4, **int2, **int8, **mma4,
                "cores.units.tensor.unpack.ternary": int2["cores.units.tensor.unpack.int2"]}
    sxm = _texts(SXM_CLOCK, fit(_fitted(("g1-",)), SXM_CLOCK, fixed={**hbm, **pipeline}))
    hopper = {key: text for key, text in pipeline.items() if ".dtype_efficiency." not in key}
    h100 = _texts(H100_CLOCK, fit(_fitted(("g2-",)), H100_CLOCK,
                                  fixed={**_carried_hbm(hbm, "gpu_h100"), **hopper}))
    pcie = {"power.sustained_clock": tiles["power.sustained_clock"]}
    h200 = _texts(H200_HBM, fit(_fitted(("m3-",)), H200_HBM,
                                fixed={**_carried_hbm(hbm, "gpu_h200"), **hopper, **h100}))
    carried = {name: {**_carried_hbm(hbm, name), **pipeline} for name in CARRIED}
    return {**carried,
            "gpu_a100_pcie": {**hbm, **pipeline, **pcie},
            "gpu_a100": {**hbm, **pipeline, **sxm},
            "gpu_a100_40gb": {**hbm, **pipeline, **sxm},
            "gpu_h100": {**_carried_hbm(hbm, "gpu_h100"), **hopper, **h100},
            "gpu_h200": {**_carried_hbm(hbm, "gpu_h200"), **hopper, **h100, **h200}}


#: GPUs without measurements of their own that take the A100 fits (same SM generation's
#: kernels; their HBM/GDDR queue scaled by peak bandwidth), as their files say.
CARRIED = ("gpu_rtx3090", "gpu_l40s")


def _carried_hbm(hbm: dict[str, str], name: str) -> dict[str, str]:
    """The A100's fitted DRAM values for machine `name`: the same latency, turnaround and
    efficiency, the queue scaled by the ratio of peak bandwidths."""
    from simulator.hardware import load_hardware

    peak = load_hardware(f"{name}.yaml").memory.dram.bandwidth_per_channel
    a100 = load_hardware("gpu_a100.yaml").memory.dram.bandwidth_per_channel
    queue = float(hbm["memory.dram.queue_bandwidth"].split()[0]) * peak / a100
    return {**hbm, "memory.dram.queue_bandwidth": f"{number(queue)} GB/s"}


def main() -> None:
    publish("fitted on gpu_kernels.yaml (gpu-measurements.md M1, G1, G1b, G2, BitBLAS A11-A18)",
            calibrate(), sys.argv[1:])


if __name__ == "__main__":
    main()
