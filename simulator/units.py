"""Physical quantities at the boundary: strings with units in, SI floats out.

Every quantity a user writes ("60 MHz", "19.2 GB/s", "32 GiB", "0.9 pJ", "4 cycle")
is parsed by pint, checked for dimension and converted to a plain float in SI base
units (Hz, bytes/s, bytes, seconds, joules, watts). Cycles are a dimension of their
own, so a latency can be given either in time or in cycles of the owning clock.
"""

from __future__ import annotations

import math
from functools import lru_cache

import pint

_REGISTRY = pint.UnitRegistry(on_redefinition="ignore", cache_folder=None)
# pint ships `bit = []` (dimensionless), which would let "10 GB" pass as a bandwidth.
# Information gets a dimension of its own; the cache is rebuilt so prefixes follow.
_REGISTRY.define("bit = [information] = b")
_REGISTRY.define("byte = 8 * bit = B = octet")
_REGISTRY.define("cycle = [cycle] = cycles = clk")
_REGISTRY._build_cache()

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
    unit, example = DIMENSIONS[dimension]
    try:
        quantity = _REGISTRY.Quantity(text.strip())
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


def format_quantity(value: float, unit: str) -> str:
    """Render an SI value with a compact prefix, e.g. 6e7 Hz → '60 MHz'."""
    return f"{_REGISTRY.Quantity(value, unit).to_compact():~.4g}"
