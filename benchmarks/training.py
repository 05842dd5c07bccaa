"""Training-step speed (not a test): wall time of one simulated step, the issue's targets.

    python benchmarks/training.py [--cold]

Each run is a fresh `simulate` process, so its wall time includes the imports, the capture
(from an empty trace cache with --cold; else the second of two runs, the cache warm) and the
engine. Targets (issue "Training steps"): Llama-2-7B, one step on one GPU ≤ 3 s; GPT-3 175B on
64 A100s (TP 8, PP 8) ≤ 10 s; Llama-3-8B at 2M tokens on 4 GPUs with FPDT ≤ 10 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

RUNS = {
    "llama2-7b, 1 × A100, batch 1 × 2048, full recompute (target 3 s)":
        ["--hw", "gpu_a100.yaml", "--model", "llama2-7b", "--batch", "1", "--seq-len", "2048",
         "--recompute", "full"],
    "llama2-7b, 8 × A100, dp 8, ZeRO-2, full recompute":
        ["--hw", "dgx_a100.yaml", "--model", "llama2-7b", "--dp", "8", "--zero", "2",
         "--recompute", "full"],
    "gpt3-xl, 8 × A100, dp 8, ZeRO-1, 64 micro-batches of 8 × 2048":
        ["--hw", "dgx_a100.yaml", "--model", "gpt3-xl", "--dp", "8", "--zero", "1", "--batch",
         "512", "--micro-batch", "8", "--seq-len", "2048"],
    "gpt3-175b, 64 × A100, tp 8, pp 8, batch 64 × 2048, full recompute (target 10 s)":
        ["--hw", "dgx_a100_cluster.yaml", "--hw-set", "nodes=8", "--model", "gpt3-175b",
         "--tp", "8", "--pp", "8", "--batch", "64", "--micro-batch", "1", "--seq-len", "2048",
         "--recompute", "full"],
    "llama3-8b, 4 × A100, FPDT (64K chunks), sp 4, ZeRO-3, AC + OC, 2M tokens (target 10 s)":
        ["--hw", "dgx_a100.yaml", "--model", "llama3-8b", "--model-set",
         "max_position_embeddings=2097152", "--sp", "4", "--zero", "3", "--recompute", "full",
         "--offload", "activations", "--chunk", "65536", "--batch", "1", "--seq-len",
         "2097152"],
}


def _run(args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "simulator.cli", "--phase", "train", *args,
                           "--format", "json"], env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode, done.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="start from an empty trace cache")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.cold:
        env["SIMULATE_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-train-")
    for label, argv in RUNS.items():
        wall, code, err = _run(argv, env)
        if not args.cold and code in (0, 2) and not err.startswith("simulate: error"):
            wall, code, err = _run(argv, env)  # the warm run
        shown = f"{wall:6.2f} s" if code == 0 or "out of memory" in err else "   —    "
        print(f"{shown}  {label}" + (f"\n          {err}" if err else ""), flush=True)


if __name__ == "__main__":
    main()
