import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulator.units import UnitError, parse


@pytest.mark.parametrize(("text", "dimension", "expected"), [
    ("60 MHz", "frequency", 60e6),
    ("1.41 GHz", "frequency", 1.41e9),
    ("19.2 GB/s", "bandwidth", 19.2e9),
    ("2 TB/s", "bandwidth", 2e12),
    ("32 GiB", "size", 32 * 2**30),
    ("64 B", "size", 64),
    ("512 bit", "bits", 512),
    ("1 byte", "bits", 8),
    ("45 ns", "time", 45e-9),
    ("3 us", "time", 3e-6),
    ("4 cycle", "cycles", 4),
    ("0.9 pJ", "energy", 0.9e-12),
    ("13.4 W", "power", 13.4),
])
def test_parses_to_si(text: str, dimension: str, expected: float) -> None:
    assert parse(text, dimension) == pytest.approx(expected)


@pytest.mark.parametrize(("text", "dimension", "fragment"), [
    ("10 GB", "bandwidth", "is not a bandwidth"),
    ("10 Hz", "bandwidth", "is not a bandwidth"),
    ("60 MB", "frequency", "is not a frequency"),
    ("12", "size", "has no unit"),
    ("5 bananas", "size", "cannot read"),
    ("", "size", "cannot read"),
    ("1e999 GB", "size", "finite"),
])
def test_rejects_wrong_or_missing_units(text: str, dimension: str, fragment: str) -> None:
    with pytest.raises(UnitError, match=fragment):
        parse(text, dimension)


@pytest.mark.parametrize("value", [12, 1.5, True, None, [1], {"a": 1}])
def test_rejects_bare_numbers_and_other_types(value: object) -> None:
    with pytest.raises(UnitError):
        parse(value, "size")  # type: ignore[arg-type]


@given(st.floats(min_value=1e-3, max_value=1e6, allow_nan=False))
def test_prefixes_scale_exactly(value: float) -> None:
    assert parse(f"{value} GB/s", "bandwidth") == pytest.approx(value * 1e9)
    assert parse(f"{value} MHz", "frequency") == pytest.approx(value * 1e6)
