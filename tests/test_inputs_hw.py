"""Bad hardware and CLI inputs end in one line naming the file or flag, the field and what
was expected (exit 2); the schema's own defaults and examples load; utilisation is honest."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import refused

from simulator.cli import main
from simulator.errors import UserError
from simulator.hardware import schema_json
from simulator.hardware.loader import locate, validate

Path_ = tuple[str, ...]


def error_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI, expecting exit 2 and exactly one line on stderr."""
    return refused(capsys, list(argv))


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main([*argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- a. duplicate YAML keys -------------------------------------------------------------

def test_duplicate_key_in_a_hardware_file(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    text = locate("fpga_1core.yaml")[1].replace("clock: 60 MHz", "clock: 60 MHz\nclock: 1 GHz", 1)
    path = tmp_path / "hw.yaml"
    path.write_text(text)
    err = error_line(capsys, "--hw", str(path), "--model", "tiny")
    assert f"{path}:" in err and "'clock' appears twice" in err


def test_duplicate_key_in_a_sweep_spec(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("hardware: [fpga_1core.yaml]\nmodels: [tiny]\nmodels: [1.3b]\n")
    err = error_line(capsys, "sweep", str(spec), "--out", str(tmp_path / "out"))
    assert f"{spec}:3" in err and "'models' appears twice" in err
    assert not (tmp_path / "out").exists()


# --- b. a dtype the machine does not rate -----------------------------------------------

def test_gemm_in_a_dtype_without_a_rate(capsys: pytest.CaptureFixture[str]) -> None:
    err = error_line(capsys, "op", "gemm", "--m", "64", "--n", "64", "--k", "64", "--dtype",
                     "fp8", "--hw", "gpu_a100.yaml")
    assert "--dtype fp8" in err and "cores.units.tensor.ops_per_cycle" in err


def test_model_dtype_without_a_rate(capsys: pytest.CaptureFixture[str]) -> None:
    err = error_line(capsys, "--hw", "fpga_1core.yaml", "--model", "tiny-llama", "--model-set",
                     "torch_dtype=float16")
    assert "torch_dtype float16" in err and "cores.units.rowwise.ops_per_cycle" in err


def test_rated_fallbacks_still_run(capsys: pytest.CaptureFixture[str]) -> None:
    # fp32 matmuls on an A100's CUDA cores (the tensor cores rate tf32, not fp32)
    assert run_json(capsys, "--hw", "gpu_a100.yaml", "--model", "tiny-llama", "--model-set",
                    "torch_dtype=float32")["latency_s"] > 0
    # bf16 matmuls on the FPGA's vector unit; ternary matmuls on its ternary unit
    assert run_json(capsys, "--hw", "fpga_1core.yaml", "--model", "tiny-llama")["latency_s"] > 0
    assert run_json(capsys, "--hw", "fpga_1core.yaml", "--model", "tiny")["latency_s"] > 0


# --- c. granularity ---------------------------------------------------------------------

def test_granularity_zero(capsys: pytest.CaptureFixture[str]) -> None:
    err = error_line(capsys, "--hw", "gpu_a100.yaml", "--model", "tiny", "--granularity", "0")
    assert "--granularity" in err and "not 0" in err


def test_granularity_zero_in_a_sweep_spec(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("hardware: [fpga_1core.yaml]\nmodels: [tiny]\ngranularity: 0\n")
    err = error_line(capsys, "sweep", str(spec), "--out", str(tmp_path / "out"))
    assert f"{spec}: granularity" in err and "greater than or equal to 1" in err


# --- d. a mapping the machine does not declare ------------------------------------------

def test_mapping_the_machine_does_not_declare(capsys: pytest.CaptureFixture[str]) -> None:
    err = error_line(capsys, "--hw", "gpu_a100.yaml", "--model", "tiny", "--mapping", "batch")
    assert "--mapping batch" in err and "scheduling.mappings" in err


def test_mapping_in_the_python_api(machine_data: dict[str, Any]) -> None:
    from simulator.api import simulate

    machine_data["scheduling"] = {"mappings": ["batch"]}
    hw = validate(machine_data, "test")
    with pytest.raises(UserError, match=r"scheduling\.mappings"):
        simulate(hw, "tiny", mapping="tensor")
    assert simulate(hw, "tiny", mapping="batch").latency_s > 0


# --- e. output files in folders that do not exist ---------------------------------------

def test_trace_into_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "no" / "such" / "x.json"
    err = error_line(capsys, "--hw", "gpu_a100.yaml", "--model", "tiny", "--trace", str(target))
    assert f"--trace {target}" in err and "does not exist" in err
    assert not (tmp_path / "no").exists()


def test_output_into_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "no" / "t.json"
    err = error_line(capsys, "trace", "--model", "tiny", "-o", str(target))
    assert f"-o {target}" in err and not (tmp_path / "no").exists()


def test_baseline_into_a_missing_folder(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "hw").mkdir()
    target = tmp_path / "no" / "baseline.csv"
    err = error_line(capsys, "regress", "--hw-dir", str(tmp_path / "hw"), "--baseline",
                     str(target), "--update")
    assert f"--baseline {target}" in err and not (tmp_path / "no").exists()


def test_plot_folder_whose_parent_is_missing(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "no" / "plots"
    err = error_line(capsys, "--hw", "gpu_a100.yaml", "--model", "tiny", "--plot", str(target))
    assert f"--plot {target}" in err and not (tmp_path / "no").exists()


def test_sweep_out_whose_parent_is_missing(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("hardware: [fpga_1core.yaml]\nmodels: [tiny]\n")
    target = tmp_path / "no" / "out"
    err = error_line(capsys, "sweep", str(spec), "--out", str(target), "--no-progress")
    assert f"--out {target}" in err and not (tmp_path / "no").exists()


def test_the_trace_cache_still_makes_its_folders(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from simulator.workload import cache
    from workloads.config import resolve_model

    monkeypatch.setenv("SIMULATE_CACHE_DIR", str(tmp_path / "a" / "b"))
    cache._RECENT.clear()
    cache.get_trace(resolve_model("tiny", None), "decode", 1, 4, 0)
    assert list((tmp_path / "a" / "b" / "traces").glob("*.json"))


# --- f. the schema's defaults and examples load -----------------------------------------

def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return root["$defs"][ref.rsplit("/", 1)[-1]] if ref else schema


def _values(schema: dict[str, Any], root: dict[str, Any]) -> Iterator[Any]:
    """The default and examples given for one property (or one of its anyOf members)."""
    if "default" in schema:
        yield schema["default"]
    yield from schema.get("examples", [])
    for member in schema.get("anyOf", []):
        yield from _resolve(member, root).get("examples", [])


def _cases(schema: dict[str, Any], root: dict[str, Any], path: Path_
           ) -> Iterator[tuple[Path_, Any]]:
    """(data path, value) of every default and example below `schema` ('*': any key)."""
    schema = _resolve(schema, root)
    for option in [_resolve(m, root) for m in schema.get("anyOf", [])] or [schema]:
        for name, prop in option.get("properties", {}).items():
            for value in _values(prop, root):
                yield (*path, name), value
            yield from _cases(prop, root, (*path, name))
        extra = option.get("additionalProperties")
        if isinstance(extra, dict):
            for value in _values(extra, root):
                yield (*path, "*"), value
            yield from _cases(extra, root, (*path, "*"))


def _put(data: dict[str, Any], path: Path_, value: Any) -> None:
    for key in path[:-1]:
        key = next(iter(data)) if key == "*" else key
        data = data.setdefault(key, {})
    data[next(iter(data)) if path[-1] == "*" else path[-1]] = value


def _loads(contexts: list[dict[str, Any]], path: Path_, value: Any) -> bool:
    for context in contexts:
        data = copy.deepcopy(context)
        try:
            _put(data, path, value)
            validate(data, "schema-case")
        except (UserError, AttributeError, StopIteration):
            continue
        return True
    return False


def test_every_schema_default_and_example_loads(machine_data: dict[str, Any]) -> None:
    # machines with every optional section between them (cross-field rules differ)
    contexts = [yaml.safe_load(locate(name)[1]) for name in ("gpu_a100.yaml", "fpga_8core.yaml")]
    contexts.append(machine_data)
    root = json.loads(schema_json())
    cases = list(_cases(root, root, ()))
    assert len(cases) > 50
    bad = [(".".join(path), value) for path, value in cases if not _loads(contexts, path, value)]
    assert not bad, bad


def test_quantity_examples_fit_their_field() -> None:
    defs = json.loads(schema_json())["$defs"]
    assert defs["Dram"]["properties"]["burst"]["examples"] == ["64 B"]
    assert defs["Dram"]["properties"]["access_width"]["examples"] == ["512 bit"]
    assert defs["Cores"]["properties"]["sram"]["examples"] == ["192 KiB"]
    assert defs["Dram"]["properties"]["latency"]["default"] == "0 s"
    assert defs["Dram"]["properties"]["access_interval"]["default"] == "1 cycle"


# --- g. honest channel utilisation ------------------------------------------------------

def test_narrow_access_shows_useful_bytes_beside_busy_time(
        capsys: pytest.CaptureFixture[str]) -> None:
    # 8-bit accesses, each occupying a 64-byte burst: busy time ≫ useful bytes
    fpga = run_json(capsys, "--hw", "fpga_1core.yaml", "--model", "tiny")
    busy, useful = fpga["channel_utilisation"], fpga["channel_useful_utilisation"]
    assert set(busy) == set(useful)
    assert 0 < useful["dram0"] < busy["dram0"] / 4
    # 64-byte accesses over 32-byte sectors: every occupied byte is useful
    gpu = run_json(capsys, "--hw", "gpu_a100.yaml", "--model", "tiny")
    for track, share in gpu["channel_utilisation"].items():
        assert gpu["channel_useful_utilisation"][track] == pytest.approx(share, rel=1e-9)


def test_table_prints_both_shares(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hw", "fpga_1core.yaml", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "channel time busy" in out and "useful bytes" in out


def test_delays_are_written_as_text_that_reads_back(machine_data: dict[str, Any]) -> None:
    from simulator.hardware import Delay

    for delay in (Delay(), Delay(cycles=1), Delay(seconds=4.25e-08), Delay(1e-6, 3.5)):
        machine_data["memory"]["dram"]["latency"] = delay.text()
        hw = validate(machine_data, "test")
        assert hw.memory.dram.latency == delay
        assert hw.model_dump(mode="json")["memory"]["dram"]["latency"] == delay.text()


def test_zero_access_interval(capsys: pytest.CaptureFixture[str]) -> None:
    # found by the long fuzz run: a core port of infinite bandwidth divided by zero
    assert main(["--hw", "gpu_a100.yaml", "--hw-set", "memory.dram.access_interval=0 cycle",
                 "--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "memory.dram.access_interval" in err
