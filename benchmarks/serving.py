"""Serving speed and scale (not a test): a Poisson chat trace on Llama-2-7B, one A100, vLLM.

    python benchmarks/serving.py [--requests 1000 10000 100000] [--rate 2] [--cold]
    python benchmarks/serving.py --requests 1000 --buckets 1 16   # bucketing's effect

Mean prompt 1,000 tokens (uniform 500 … 1,500), mean output 250 (uniform 125 … 375). Each
size runs in a fresh process, so its wall time includes the imports, the captures a new
model needs (from an empty trace cache with --cold) and every engine run; the peak RSS is
the process's. Cost per request should stay flat as the number of requests grows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ONE = """
import json, resource, sys, time
start = time.perf_counter()
from simulator.serving.loop import Options
from simulator.serving.requests import RequestSpec
from simulator.serving.serve import run_serving
n, rate, bucket = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
spec = RequestSpec.model_validate({
    "arrival": "poisson", "rate": f"{rate} /s", "num_requests": n, "seed": 0,
    "prompt": {"dist": "uniform", "low": 500, "high": 1500},
    "output": {"dist": "uniform", "low": 125, "high": 375}})
result = run_serving("gpu_a100.yaml", "llama2-7b", spec, Options(scheduler="vllm", bucket=bucket))
s = result.summary
print(json.dumps({"wall_s": time.perf_counter() - start,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "engine_runs": s["engine_runs"], "steps": s["steps"],
                  "ttft_p99_s": s["ttft_s"]["p99"], "tpot_p50_s": s["tpot_s"]["p50"],
                  "output_tokens_per_s": s["output_tokens_per_s"],
                  "preemptions": s["preemptions"],
                  "metrics": {f"{k}.{p}": s[k][p] for k in ("ttft_s", "tpot_s", "e2e_s", "queue_s")
                              for p in ("mean", "p50", "p90", "p99")}
                  | {k: s[k] for k in ("makespan_s", "output_tokens_per_s",
                                       "energy_per_output_token_j")}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--rate", default="2")
    parser.add_argument("--cold", action="store_true", help="start from an empty trace cache")
    parser.add_argument("--buckets", type=int, nargs="+", default=[16],
                        help="context bucket widths to run (the first is the reference)")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.cold:
        env["SIMULATE_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-serve-")
    print(f"{'requests':>9} {'wall s':>8} {'ms/request':>10} {'peak RSS MiB':>12} "
          f"{'engine runs':>11} {'steps':>8} {'TTFT p99 s':>10} {'tok/s':>8}")
    for n in args.requests:
        reference = None
        for bucket in args.buckets:
            out = subprocess.run([sys.executable, "-c", ONE, str(n), args.rate, str(bucket)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            steps = sum(got["steps"].values())
            print(f"{n:>9} {got['wall_s']:>8.1f} {got['wall_s'] / n * 1e3:>10.2f} "
                  f"{got['peak_rss_bytes'] / 2**20:>12.0f} {got['engine_runs']:>11} "
                  f"{steps:>8} {got['ttft_p99_s']:>10.2f} {got['output_tokens_per_s']:>8.0f}"
                  f"   (bucket {bucket})", flush=True)
            if reference is None:
                reference = got["metrics"]
                continue
            worst = max(reference, key=lambda k: abs(got["metrics"][k] / reference[k] - 1)
                        if reference[k] else 0.0)
            for key, ref in reference.items():
                change = got["metrics"][key] / ref - 1 if ref else 0.0
                print(f"    {key:<28} {ref:>12.5g} → {got['metrics'][key]:<12.5g} "
                      f"{change:+.2%}{'  (largest)' if key == worst else ''}")


if __name__ == "__main__":
    main()
