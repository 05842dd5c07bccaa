"""Traces cached on disk (a user cache directory, never the source tree).

Keyed by the code that makes a trace (a hash of its sources and the torch version), the
model config, phase, batch, context and prompt, so an edited workload never reuses an old
trace and a repeated run neither imports torch nor rebuilds the model.
`SIMULATE_CACHE_DIR` overrides the location.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from platformdirs import user_cache_dir

from simulator.errors import UserError
from simulator.files import write_atomic
from simulator.workload.trace import FORMAT_VERSION, Phase, Trace
from workloads import config as model_configs
from workloads.models import AnyModel

T = TypeVar("T")
_HERE = Path(__file__).resolve().parent
#: The code that determines a trace: the model builders (workloads/*.py) and the capture.
SOURCES: tuple[Path, ...] = (
    *sorted(Path(model_configs.__file__).resolve().parent.glob("*.py")),
    _HERE / "capture.py", _HERE / "trace.py", _HERE / "training.py")


def _version(package: str) -> str:
    """An installed package's version, read from its metadata (importing it is slow)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


@functools.cache
def code_hash() -> str:
    """sha256 of SOURCES (names and bytes) and the torch and transformers versions;
    computed once a process."""
    digest = hashlib.sha256(f"torch {_version('torch')}\n".encode())
    digest.update(f"transformers {_version('transformers')}\n".encode())
    for path in SOURCES:
        try:
            content = path.read_bytes()
        except OSError:
            content = b"(missing)"
        digest.update(f"{path.name} {len(content)}\n".encode() + content)
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("SIMULATE_CACHE_DIR") or user_cache_dir("llm-hwsim")) / "traces"


def _key(cfg: AnyModel, phase: Phase, batch: int, context: int, prompt: int) -> str:
    text = f"{FORMAT_VERSION}/{code_hash()}/{cfg.key()}/{phase}/{batch}/{context}/{prompt}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def get_trace(cfg: AnyModel, phase: Phase, batch: int, context: int, prompt: int,
              use_cache: bool = True, derive: bool = False) -> Trace:
    """The trace of one step, from the cache when present, else captured (and cached).
    `derive`: derived from captures of other shapes where the model allows it
    (simulator.workload.reshape; bit for bit the capture), and not cached on disk.

    Every simulated model passes here, so here its positional limit is enforced."""
    cfg.check_positions(phase, context, prompt)
    path = cache_dir() / f"{_key(cfg, phase, batch, context, prompt)}.json"
    if use_cache and (known := _RECENT.get(path)) is not None:
        return known
    if derive and use_cache and not path.is_file():
        from simulator.workload.reshape import derived

        def capture(kind: str, b: int, n: int) -> Trace:
            return get_trace(cfg, kind, b, n if kind == "decode" else 0,  # type: ignore[arg-type]
                             n if kind == "prefill" else 0)

        length = context if phase == "decode" else prompt
        trace = derived(cfg.key(), phase, batch, length, capture, cfg.position_limit)
        if trace is not None:
            return _remember(path, trace)
    if use_cache and path.is_file():
        try:
            return _remember(path, Trace.load(path))
        except (ValueError, TypeError, KeyError, OSError):
            path.unlink(missing_ok=True)
    from simulator.workload.capture import capture  # imports torch: only on a miss

    trace = capture(cfg, phase, batch, context, prompt)
    if use_cache:
        with contextlib.suppress(UserError):  # an unwritable cache only costs speed
            write_atomic(path, trace.to_json(), "cache", make_parents=True)
    return _remember(path, trace)


def cached(cfg: AnyModel, shape: str, use_cache: bool, load: Callable[[str], T],
           dump: Callable[[T], str], make: Callable[[], T]) -> T:
    """A value of `cfg` at `shape` (another kind of trace: a training step's) from the
    cache, else made by `make` and cached; keyed like `get_trace`'s traces."""
    text = f"{FORMAT_VERSION}/{code_hash()}/{cfg.key()}/{shape}"
    path = cache_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
    if use_cache and (known := _RECENT.get(path)) is not None:
        return known  # type: ignore[return-value]
    if use_cache and path.is_file():
        try:
            return _remember(path, load(path.read_text(encoding="utf-8")))  # type: ignore[arg-type]
        except (ValueError, TypeError, KeyError, OSError):
            path.unlink(missing_ok=True)
    value = make()
    if use_cache:
        with contextlib.suppress(UserError):
            write_atomic(path, dump(value), "cache", make_parents=True)
    return _remember(path, value)  # type: ignore[arg-type]


#: Traces this process used last (they are immutable): a sweep reads each file once.
_RECENT: dict[Path, Any] = {}
_RECENT_SIZE = 8


def _remember(path: Path, trace: T) -> T:
    _RECENT.pop(path, None)
    _RECENT[path] = trace
    while len(_RECENT) > _RECENT_SIZE:
        del _RECENT[next(iter(_RECENT))]
    return trace
