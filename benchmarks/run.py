"""Speed benchmarks of the simulator (not tests): wall time, events, events per second.

    python benchmarks/run.py [--repeat 3] [--quick]

Each case is timed in one process after a warm-up run (which also fills the trace cache),
as the median of `--repeat` runs; the coarse (default) event granularity is compared with
the finest one; cost is shown against layers and against prompt length.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from simulator.api import simulate
from simulator.collective import run_collective
from simulator.hardware.system import load_system
from simulator.sweep import run_sweep

FINEST = 10**6  # chunks per part: every tile its own chunk (the default: DEFAULT_GRANULARITY)
CASES = [
    ("main job: fpga_8core, 1.3b, decode", "fpga_8core.yaml", "1.3b", {}, 1.0),
    ("transformerpp-13b prefill 2048, gpu_a100", "gpu_a100.yaml", "transformerpp-13b",
     {"phase": "prefill", "prompt": 2048}, 2.0),
    ("llama2-7b decode, gpu_h100", "gpu_h100.yaml", "llama2-7b", {}, None),
    ("llama2-70b decode, dgx_a100, tp 8", "dgx_a100.yaml", "llama2-70b", {"tp": 8}, 2.0),
    ("mixtral-8x7b prefill 8 × 2048, dgx_a100, ep 8", "dgx_a100.yaml", "mixtral-8x7b",
     {"phase": "prefill", "batch": 8, "prompt": 2048, "ep": 8}, 5.0),
]


def timed(repeat: int, hw: str, model: str, **kwargs: object) -> tuple[float, object]:
    simulate(hw, model, **kwargs)  # warm-up: imports, trace capture, caches
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = simulate(hw, model, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def command_seconds(repeat: int) -> float:
    """Median wall time of the main job as a fresh process (trace already cached)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "simulator.cli", "--hw", "fpga_8core.yaml",
                        "--model", "1.3b", "--format", "json"], check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def collective_seconds(repeat: int) -> float:
    """Median wall time of loading a 512-GPU system and timing one 1 GiB all-reduce."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        system, _ = load_system("dgx_a100_cluster.yaml", {"nodes": 64})
        run_collective(system, "allreduce", 1 << 30)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep_seconds(points: int) -> float:
    folder = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    counts = [1, 2, 3, 4, 6, 8, 12, 16, 20, 26]
    clocks = [f"{c} MHz" for c in range(50, 50 + 10 * (points // 20), 10)]
    spec = {"hardware": ["fpga_1core.yaml", "fpga_1core_burst.yaml"],
            "grid": {"cores.count": counts, "clock": clocks}, "models": ["1.3b"]}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    run_sweep(folder / "spec.yaml", folder / "out", progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="skip the scaling curves")
    args = parser.parse_args()
    print(f"{'case':<44}{'wall s':>8}{'target':>8}{'events':>10}{'events/s':>11}"
          f"{'fine vs coarse':>16}")
    for name, hw, model, kwargs, target in CASES:
        seconds, result = timed(args.repeat, hw, model, **kwargs)
        fine = simulate(hw, model, granularity=FINEST, **kwargs)
        gap = (result.latency_s - fine.latency_s) / fine.latency_s
        target_text = f"≤{target:g}" if target else ""
        print(f"{name:<44}{seconds:>8.2f}{target_text:>8}{result.events:>10}"
              f"{result.events / seconds:>11.0f}{gap:>+15.3%}")
    print(f"{'1 GiB all-reduce, 512 GPUs (64 DGX A100)':<44}"
          f"{collective_seconds(args.repeat):>8.2f}{'≤5':>8}")
    command = command_seconds(args.repeat)
    print(f"{'main job, whole command (start-up incl.)':<44}{command:>8.2f}{'≤3':>8}")
    print(f"{'100-point FPGA sweep (1.3b)':<44}{sweep_seconds(100):>8.2f}{'≤60':>8}")
    if args.quick:
        return
    print("\ncost against layers (mmfree, d = 2048, fpga_8core decode):")
    for layers in (6, 12, 24, 48):
        seconds, result = timed(args.repeat, "fpga_8core.yaml", "1.3b",
                                model_set={"num_hidden_layers": str(layers)})
        print(f"  {layers:>3} layers: {seconds:6.2f} s, {result.events} events")
    print("cost against prompt (llama2-7b prefill, gpu_a100):")
    for prompt in (256, 512, 1024, 2048, 4096):
        seconds, result = timed(args.repeat, "gpu_a100.yaml", "llama2-7b", phase="prefill",
                                prompt=prompt)
        print(f"  {prompt:>5} tokens: {seconds:6.2f} s, {result.events} events")


if __name__ == "__main__":
    main()
