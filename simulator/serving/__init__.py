"""Request-level serving: workloads, schedulers, KV cache and metrics."""
