"""Traces cached on disk (a user cache directory, never the source tree).

Keyed by model config, phase, batch, context and prompt, so a repeated run neither
imports torch nor rebuilds the model. `SIMULATE_CACHE_DIR` overrides the location.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from platformdirs import user_cache_dir

from simulator.errors import UserError
from simulator.files import write_atomic
from simulator.workload.trace import FORMAT_VERSION, Phase, Trace
from workloads.config import ModelConfig

#: Bump when capture semantics change so stale traces are not reused.
CAPTURE_VERSION = 2


def cache_dir() -> Path:
    return Path(os.environ.get("SIMULATE_CACHE_DIR") or user_cache_dir("llm-hwsim")) / "traces"


def _key(cfg: ModelConfig, phase: Phase, batch: int, context: int, prompt: int) -> str:
    text = f"{FORMAT_VERSION}/{CAPTURE_VERSION}/{cfg.key()}/{phase}/{batch}/{context}/{prompt}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def get_trace(cfg: ModelConfig, phase: Phase, batch: int, context: int, prompt: int,
              use_cache: bool = True) -> Trace:
    """The trace of one step, from the cache when present, else captured (and cached)."""
    path = cache_dir() / f"{_key(cfg, phase, batch, context, prompt)}.json"
    if use_cache and (known := _RECENT.get(path)) is not None:
        return known
    if use_cache and path.is_file():
        try:
            return _remember(path, Trace.load(path))
        except (ValueError, TypeError, KeyError, OSError):
            path.unlink(missing_ok=True)
    from simulator.workload.capture import capture  # imports torch: only on a miss

    trace = capture(cfg, phase, batch, context, prompt)
    if use_cache:
        with contextlib.suppress(UserError):  # an unwritable cache only costs speed
            write_atomic(path, trace.to_json(), "cache")
    return _remember(path, trace)


#: Traces this process used last (they are immutable): a sweep reads each file once.
_RECENT: dict[Path, Trace] = {}
_RECENT_SIZE = 8


def _remember(path: Path, trace: Trace) -> Trace:
    _RECENT.pop(path, None)
    _RECENT[path] = trace
    while len(_RECENT) > _RECENT_SIZE:
        del _RECENT[next(iter(_RECENT))]
    return trace
