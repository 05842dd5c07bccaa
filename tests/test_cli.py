"""The CLI end to end: the JSON contract, formats, sub-commands and every bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.cli import main

CONTRACT = {"hardware", "model", "phase", "batch", "context", "prompt", "latency_s",
            "tokens_per_s", "power_w", "energy_per_token_j", "memory_bytes", "weights_bytes",
            "state_bytes", "activation_bytes", "layers"}


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main([*args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_main_job_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "--hw", "fpga_8core.yaml", "--model", "1.3b")
    assert set(data) >= CONTRACT
    assert data["phase"] == "decode" and data["batch"] == 1
    assert data["tokens_per_s"] == pytest.approx(1 / data["latency_s"])
    assert data["memory_bytes"] == (data["weights_bytes"] + data["state_bytes"]
                                    + data["activation_bytes"])
    names = [layer["name"] for layer in data["layers"]]
    assert names == ["embed", *[f"layers.{i}" for i in range(24)], "norm", "lm_head"]
    assert sum(layer["latency_s"] for layer in data["layers"]) == pytest.approx(
        data["latency_s"])
    assert data["energy_per_token_j"] == pytest.approx(data["power_w"] * data["latency_s"])
    # every byte of the 2-bit ternary weights crosses the DDR4 channels once per token
    assert data["dram_bytes"] >= 1_298_661_376 / 4


def test_gpu_prefill_json(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "--hw", "gpu_a100.yaml", "--model", "llama2-7b", "--phase",
                    "prefill", "--prompt", "2048")
    assert data["prompt"] == 2048 and data["context"] == 0
    assert data["tokens_per_s"] == pytest.approx(2048 / data["latency_s"])
    # 28.2 TFLOP cannot run faster than the 312 TFLOP/s bf16 peak
    assert data["latency_s"] > 28.2e12 / 312e12
    assert 100 < data["power_w"] <= 400


def test_same_command_gives_byte_identical_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--hw", "fpga_8core.yaml", "--model", "tiny", "--format", "json"]
    main(args)
    first = capsys.readouterr().out
    main([*args, "--no-cache"])
    assert capsys.readouterr().out == first


def test_table_names_the_essentials(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hw", "fpga_1core.yaml", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    for word in ("tiny on d5005-mmfree-1core", "latency per token", "tokens/s", "average power",
                 "energy per token", "weights", "state", "activations", "layers.1",
                 "lm_head"):
        assert word in out


def test_csv_has_a_row_per_layer_and_a_total(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hw", "fpga_1core.yaml", "--model", "tiny", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("hardware,model,phase")
    assert [line.split(",")[7] for line in lines[1:]] == [
        "embed", "layers.0", "layers.1", "norm", "lm_head", "total"]


def test_overrides_change_the_result(capsys: pytest.CaptureFixture[str]) -> None:
    base = run_json(capsys, "--hw", "fpga_1core.yaml", "--model", "tiny")
    slower = run_json(capsys, "--hw", "fpga_1core.yaml", "--model", "tiny", "--hw-set",
                      "clock=30 MHz")
    assert slower["latency_s"] > 1.5 * base["latency_s"]
    fp32 = run_json(capsys, "--hw", "gpu_a100.yaml", "--model", "tiny-llama", "--model-set",
                    "torch_dtype=float32")
    bf16 = run_json(capsys, "--hw", "gpu_a100.yaml", "--model", "tiny-llama")
    assert fp32["weights_bytes"] == pytest.approx(2 * bf16["weights_bytes"], rel=0.01)


def test_model_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
        "vocab_size": 100, "torch_dtype": "float16", "architectures": ["LlamaForCausalLM"]}))
    data = run_json(capsys, "--hw", "gpu_h100.yaml", "--model", str(config))
    assert data["model"] == "config" and len(data["layers"]) == 5


def test_schema_and_trace_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert "properties" in json.loads(capsys.readouterr().out)
    out = tmp_path / "sub" / "trace.json"
    assert main(["trace", "--model", "tiny", "--phase", "prefill", "--prompt", "8", "-o",
                 str(out)]) == 2  # the folder must exist: nothing is created on the way
    capsys.readouterr()
    out.parent.mkdir()
    assert main(["trace", "--model", "tiny", "--phase", "prefill", "--prompt", "8", "-o",
                 str(out)]) == 0
    trace = json.loads(out.read_text())
    assert trace["phase"] == "prefill" and trace["prompt"] == 8 and trace["ops"]
    assert main(["list"]) == 0
    assert "fpga_8core.yaml" in capsys.readouterr().out


BAD = [
    (["--hw", "nope.yaml", "--model", "1.3b"], "no hardware file"),
    (["--hw", "/", "--model", "1.3b"], "is not a regular file"),
    (["--hw", "fpga_1core.yaml", "--model", "7b-unknown"], "unknown model"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--batch", "0"], "--batch"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--batch", "x"], "--batch"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--context", "-1"], "--context"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--phase", "prefill", "--prompt", "0"],
     "--prompt"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--phase", "sideways"], "--phase"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--mapping", "pipeline"], "--mapping"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--hw-set", "clock=54"], "has no unit"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--hw-set", "clock=54 GB"],
     "is not a frequency"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--hw-set", "cores.count=0"], "cores.count"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--hw-set", "clock"], "KEY=VALUE"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--hw-set", "cores.count=5000"],
     "arbitration_growth"),
    (["--hw", "gpu_a100.yaml", "--model", "tiny", "--hw-set",
      "cores.units.tensor.tiles=[[0, 1, 1]]"], "tiles"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--model-set", "hidden=3"], "unknown field"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--model-set", "hidden_size=-4"],
     "hidden_size"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--model-set", "torch_dtype=int3"],
     "torch_dtype"),
    (["--hw", "fpga_1core.yaml", "--model", "tiny", "--hw-set",
      "memory.dram.capacity=1 KiB"], "memory.dram.capacity"),
    (["--hw", "fpga_1core.yaml"], "--model"),
    (["--model", "tiny"], "--hw"),
    (["trace", "--model", "tiny"], "-o"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD)
def test_bad_input_is_one_line_exit_2(args: list[str], fragment: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simulate: error:")
    assert fragment in lines[0]


def test_bad_files_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {"syntax.yaml": "name: [", "unknown.yaml": "name: x\nbogus: 1\n",
             "config.json": "{not json"}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        args = (["--hw", str(path), "--model", "tiny"] if name.endswith("yaml")
                else ["--hw", "fpga_1core.yaml", "--model", str(path)])
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0]
    assert main(["--hw", "fpga_1core.yaml", "--model", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_console_script_runs_without_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "simulate"
    done = subprocess.run([str(script), "--hw", str(tmp_path / "x.yaml"), "--model", "1.3b"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    done = subprocess.run([str(script), "--hw", "fpga_8core.yaml", "--model", "tiny"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "tokens/s" in done.stdout
