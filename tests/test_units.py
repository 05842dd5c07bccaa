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


def test_remembered_answers_are_pints_own(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from simulator import units

    monkeypatch.setenv("SIMULATE_CACHE_DIR", str(tmp_path))
    units._memo.cache_clear()
    units._parse_text.cache_clear()
    texts = [("1.41 GHz", "frequency"), ("19.2 GB/s", "bandwidth"), ("0.9 pJ", "energy"),
             ("4 cycle", "cycles")]
    first = [parse(text, dimension) for text, dimension in texts]
    with pytest.raises(UnitError, match="is not a time"):
        parse("4 cycle", "time")
    memo = json.loads((tmp_path / "units.json").read_text())["values"]
    assert [memo[f"{d}|{t}"] for t, d in texts] == first
    assert first == [units._parse_with_pint(t, d) for t, d in texts]  # bit for bit
    units._memo.cache_clear()
    units._parse_text.cache_clear()
    with pytest.raises(UnitError, match="is not a time"):  # a remembered refusal
        parse("4 cycle", "time")
    (tmp_path / "units.json").write_text("{not json")
    units._memo.cache_clear()
    units._parse_text.cache_clear()
    assert parse("1.41 GHz", "frequency") == first[0]
    stale = {"key": "other definitions", "values": {"frequency|1.41 GHz": 1.0}}
    (tmp_path / "units.json").write_text(json.dumps(stale))  # made under other definitions
    units._memo.cache_clear()
    units._parse_text.cache_clear()
    assert parse("1.41 GHz", "frequency") == first[0]
    units._memo.cache_clear()
    units._parse_text.cache_clear()


def test_a_repeated_run_imports_neither_pint_torch_transformers_nor_pandas(tmp_path) -> None:
    import os
    import subprocess
    import sys

    probe = ("import sys; from simulator.cli import main; main(sys.argv[1:]); "
             "heavy = {'pint', 'torch', 'transformers', 'pandas', 'dask'} & set(sys.modules); "
             "assert not heavy, heavy")
    env = {**os.environ, "SIMULATE_CACHE_DIR": str(tmp_path)}
    for argv in (["--hw", "fpga_8core.yaml", "--model", "tiny"],
                 ["op", "gemm", "--hw", "gpu_a100.yaml", "--m", "64", "--n", "64", "--k", "64"]):
        subprocess.run([sys.executable, "-c", probe.replace("assert", "0 and"), *argv],
                       env=env, check=True, capture_output=True, timeout=300)  # fills caches
        done = subprocess.run([sys.executable, "-c", probe, *argv], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-500:]
