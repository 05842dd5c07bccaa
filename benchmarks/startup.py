"""Whole-command wall times (fresh processes), as a user meets them (not tests).

    python benchmarks/startup.py [--repeat 3]

A fresh trace/units cache is used, so the first run of each model includes importing
torch and transformers, building it on meta and capturing it; the repeats are cached.
Targets (issue "Any model"): first 7B-class HF run ≤ 10 s, cached ≤ 2 s; main job ≤ 1 s;
`simulate op gemm` ≤ 0.3 s; Mixtral-8x7B prefill of 2048 tokens (640 GB) cached ≤ 5 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES: list[tuple[str, list[str], float]] = [
    ("main job: fpga_8core, 1.3b", ["--hw", "fpga_8core.yaml", "--model", "1.3b"], 1.0),
    ("simulate op gemm 1024³ on gpu_a100",
     ["op", "gemm", "--hw", "gpu_a100.yaml", "--m", "1024", "--n", "1024", "--k", "1024"], 0.3),
    ("mistral-7b decode (HF), gpu_a100", ["--hw", "gpu_a100.yaml", "--model", "mistral-7b"],
     2.0),
    ("mixtral-8x7b prefill 2048 (HF, MoE), gpu_a100 640 GB",
     ["--hw", "gpu_a100.yaml", "--model", "mixtral-8x7b", "--phase", "prefill", "--prompt",
      "2048", "--hw-set", "memory.dram.capacity=640 GB"], 5.0),
]


def run(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "simulator.cli", *argv], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "SIMULATE_CACHE_DIR": tempfile.mkdtemp(prefix="bench-startup-")}
    print(f"{'case':<54}{'first s':>9}{'cached s':>10}{'target s':>10}  ok")
    for name, argv, target in CASES:
        first = run(argv, env)
        cached = statistics.median(run(argv, env) for _ in range(args.repeat))
        print(f"{name:<54}{first:>9.2f}{cached:>10.2f}{target:>10.2f}  "
              f"{'yes' if cached <= target else 'NO'}")


if __name__ == "__main__":
    main()
