"""Physical quantities at the boundary: strings with units in, SI floats out.

Every quantity a user writes ("60 MHz", "19.2 GB/s", "32 GiB", "0.9 pJ", "4 cycle")
is parsed by pint, checked for dimension and converted to a plain float in SI base
units (Hz, bytes/s, bytes, seconds, joules, watts). Cycles are a dimension of their
own, so a latency can be given either in time or in cycles of the owning clock.

pint's answers are remembered on disk (`units.json` in the user cache, beside the
traces): building the registry costs a third of a second, so a run whose quantities were
all read before neither imports pint nor builds it. The values are pint's own, bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

#: The units a hardware description needs, with SI and binary prefixes. pint's default
#: registry (1,000 definitions) takes 0.6 s to build; it also ships `bit = []`
#: (dimensionless), which would let "10 GB" pass as a bandwidth, so information has a
#: dimension of its own here, as do cycles (a latency may be given in either).
_DEFINITIONS = """
yocto- = 1e-24 = y-
zepto- = 1e-21 = z-
atto- = 1e-18 = a-
femto- = 1e-15 = f-
pico- = 1e-12 = p-
nano- = 1e-9 = n-
micro- = 1e-6 = µ- = μ- = u-
milli- = 1e-3 = m-
kilo- = 1e3 = k-
mega- = 1e6 = M-
giga- = 1e9 = G-
tera- = 1e12 = T-
peta- = 1e15 = P-
exa- = 1e18 = E-
kibi- = 2**10 = Ki-
mebi- = 2**20 = Mi-
gibi- = 2**30 = Gi-
tebi- = 2**40 = Ti-
pebi- = 2**50 = Pi-
exbi- = 2**60 = Ei-
second = [time] = s = sec
minute = 60 * second = min
hour = 60 * minute = h = hr
hertz = 1 / second = Hz
bit = [information] = b
byte = 8 * bit = B = octet
cycle = [cycle] = cycles = clk
joule = [energy] = J
watt = joule / second = W
watt_hour = watt * hour = Wh
"""
#: Remembered answers at most (a fuzz run must not grow the file without bound).
MEMO_SIZE = 4096


@cache
def _registry() -> Any:
    """pint's registry of the units above (imports pint: only when a quantity is new)."""
    import pint

    registry = pint.UnitRegistry(None)
    for line in _DEFINITIONS.strip().splitlines():
        registry.define(line)
    registry._build_cache()
    return registry


def memo_path() -> Path:
    from platformdirs import user_cache_dir

    root = os.environ.get("SIMULATE_CACHE_DIR") or user_cache_dir("llm-hwsim")
    return Path(root) / "units.json"


@cache
def _memo_key() -> str:
    """What the remembered answers depend on: the unit definitions, the dimensions and
    pint's version (read from its metadata, not by importing it)."""
    from importlib import metadata

    try:
        version = metadata.version("pint")
    except metadata.PackageNotFoundError:
        version = "none"
    text = json.dumps([_DEFINITIONS, DIMENSIONS, version])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@cache
def _memo() -> dict[str, float | str]:
    """pint's earlier answers ({"dimension|text": value, or the UnitError's message}) for
    these definitions; empty if unreadable or made under others."""
    try:
        data = json.loads(memo_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("key") != _memo_key() or not isinstance(
            data.get("values"), dict):
        return {}
    return {k: v for k, v in data["values"].items()
            if isinstance(v, str) or (isinstance(v, float) and math.isfinite(v))}


def _remember(key: str, value: float | str) -> None:
    memo = _memo()
    if len(memo) >= MEMO_SIZE:
        return
    memo[key] = value
    from simulator.errors import UserError
    from simulator.files import write_atomic

    with contextlib.suppress(UserError, OSError):  # an unwritable cache only costs speed
        write_atomic(memo_path(), json.dumps({"key": _memo_key(), "values": memo},
                                             sort_keys=True), "cache", make_parents=True)

#: name → (pint unit the value is converted to, example shown in errors)
DIMENSIONS: dict[str, tuple[str, str]] = {
    "frequency": ("Hz", "60 MHz"),
    "bandwidth": ("byte/s", "19.2 GB/s"),
    "size": ("byte", "32 GiB"),
    "bits": ("bit", "512 bit"),
    "time": ("s", "120 ns"),
    "cycles": ("cycle", "4 cycle"),
    "energy": ("J", "0.9 pJ"),
    "power": ("W", "13.4 W"),
}


class UnitError(ValueError):
    """A quantity that is missing its unit, has the wrong dimension or is not a number."""


def parse(text: str | int | float, dimension: str) -> float:
    """Parse `text` as a quantity of `dimension` and return its value in SI base units."""
    _, example = DIMENSIONS[dimension]
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise UnitError(f"expected a {dimension} with its unit, e.g. '{example}'")
    if isinstance(text, (int, float)):
        raise UnitError(f"'{text}' has no unit; expected a {dimension}, e.g. '{example}'")
    return _parse_text(text, dimension)


@lru_cache(maxsize=4096)
def _parse_text(text: str, dimension: str) -> float:
    key = f"{dimension}|{text.strip()}"
    known = _memo().get(key)
    if isinstance(known, str):
        raise UnitError(known)
    if known is not None:
        return known
    try:
        value = _parse_with_pint(text, dimension)
    except UnitError as exc:
        _remember(key, str(exc))
        raise
    _remember(key, value)
    return value


def _parse_with_pint(text: str, dimension: str) -> float:
    import pint

    unit, example = DIMENSIONS[dimension]
    try:
        quantity = _registry().Quantity(text.strip())
    except Exception as exc:  # pint raises many types for unparsable input
        raise UnitError(f"cannot read '{text}' as a {dimension}, e.g. '{example}'") from exc
    if not isinstance(quantity, pint.Quantity) or quantity.unitless:
        raise UnitError(f"'{text}' has no unit; expected a {dimension}, e.g. '{example}'")
    try:
        value = float(quantity.to(unit).magnitude)
    except pint.DimensionalityError as exc:
        raise UnitError(
            f"'{text}' is not a {dimension} (it is {quantity.dimensionality}); e.g. '{example}'"
        ) from exc
    if not math.isfinite(value):
        raise UnitError(f"'{text}' is not a finite {dimension}")
    return value

