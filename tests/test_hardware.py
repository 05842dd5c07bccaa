import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from simulator.errors import UserError
from simulator.hardware import load_hardware, schema_json, shipped

# nine levels of nine-fold aliases: 9^6 nodes once expanded ("billion laughs")
ALIAS_BOMB = "a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
    f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcde", "bcdef", strict=True))
SHIPPED = ["fpga_1core.yaml", "fpga_8core.yaml", "fpga_16core.yaml", "fpga_26core.yaml",
           "fpga_1core_burst.yaml", "gpu_a100.yaml", "gpu_a100_40gb.yaml", "gpu_h100.yaml"]


def write(tmp_path: Path, data: Any, name: str = "hw.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_every_required_machine_is_shipped_and_loads() -> None:
    assert set(SHIPPED) <= set(shipped())
    for name in SHIPPED:
        hw = load_hardware(name)
        assert hw.core_clock > 0 and hw.cores.count >= 1


def test_shipped_fpga_and_gpu_facts() -> None:
    fpga = load_hardware("fpga_8core.yaml")
    assert fpga.cores.count == 8 and fpga.core_clock == 60e6
    assert fpga.memory.dram.channels == 4 and fpga.memory.dram.access_width == 8
    assert fpga.memory.dram.bandwidth_per_channel == pytest.approx(19.2e9)
    assert load_hardware("fpga_1core_burst.yaml").memory.dram.access_width == 512
    a100 = load_hardware("gpu_a100.yaml")
    peak = a100.cores.units["tensor"].ops_per_cycle["bf16"] * a100.cores.count * a100.clock
    assert peak == pytest.approx(312e12, rel=0.01)  # datasheet 312 TFLOPS bf16
    h100 = load_hardware("gpu_h100.yaml")
    peak = h100.cores.units["tensor"].ops_per_cycle["bf16"] * h100.cores.count * h100.clock
    assert peak == pytest.approx(989.4e12, rel=0.01)


#: What a comment must carry to count as provenance: a kind of origin, or a citation.
PROVENANCE = re.compile(r"\bassumed\b|\bFITTED\b|\bEMPIRICAL\b|\bderived\b|\bmodel:|et al\.|"
                        r"\(\d{4}\)|[\w.-]+/[\w.-]+#\d+")
TAG = re.compile(r"\[([A-Za-z0-9]+)\]")


def provenance_problems(text: str) -> list[str]:
    """Lines of a hardware file whose number has no source: no comment on it (or just above),
    or one that names neither a citation tag defined in the header, a kind of origin
    (assumed, FITTED, EMPIRICAL, derived, model:) nor a publication."""
    lines = text.splitlines()
    header = "\n".join(line for line in lines[:next(
        (i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))])
    defined = set(TAG.findall(header))
    problems = []
    for number, line in enumerate(lines, 1):
        body, _, comment = line.partition("#")
        key = body.split(":")[0].strip()
        if key in {"name", "description", "kind"} or not any(c.isdigit() for c in
                                                                body.partition(":")[2]):
            continue
        above = lines[number - 2].strip() if number > 1 else ""
        comment = comment or (above[1:] if above.startswith("#") else "")
        tags = set(TAG.findall(comment))
        if not (PROVENANCE.search(comment) or (tags and tags <= defined)):
            problems.append(f"{number}: {line.strip()}")
    return problems


def test_every_shipped_number_has_a_source_comment() -> None:
    folder = Path(__file__).resolve().parents[1] / "hwconfigs"
    for path in sorted(folder.glob("*.yaml")):
        assert not provenance_problems(path.read_text()), (path.name,
                                                           provenance_problems(path.read_text()))


def test_a_comment_without_a_source_is_caught() -> None:
    header = "# Board X. Sources: the datasheet [DS].\n"
    assert not provenance_problems(header + "clock: 1 GHz  # [DS] boost clock\n")
    assert not provenance_problems(header + "clock: 1 GHz  # assumed: typical\n")
    assert provenance_problems(header + "clock: 1 GHz  # boost clock\n")
    assert provenance_problems(header + "clock: 1 GHz  # [WP] an undefined tag\n")
    assert provenance_problems(header + "name: x\nclock: 1 GHz\n")


def test_by_path_and_by_bare_name_agree(tmp_path: Path) -> None:
    copy = write(tmp_path, (Path(__file__).parents[1] / "hwconfigs" / "fpga_8core.yaml")
                 .read_text())
    by_path, by_name = load_hardware(copy), load_hardware("fpga_8core.yaml")
    assert by_path.model_dump() == by_name.model_dump() == load_hardware("fpga_8core").model_dump()
    assert by_path.source == str(copy) and by_name.source == "fpga_8core.yaml"  # errors name it


def test_schema_is_json_schema_with_sections() -> None:
    schema = json.loads(schema_json())
    assert schema["type"] == "object"
    assert {"clock", "cores", "memory", "power"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_overrides_apply_units() -> None:
    hw = load_hardware("fpga_1core.yaml", {"clock": "54 MHz", "cores.count": 4})
    assert hw.core_clock == 54e6 and hw.cores.count == 4


@pytest.mark.parametrize(("mutate", "fragment"), [
    (lambda d: d.update(clok="1 GHz"), "clok: unknown key"),
    (lambda d: d["cores"].update(cont=2), "cores.cont: unknown key"),
    (lambda d: d.pop("clock"), "clock: required field is missing"),
    (lambda d: d.update(clock=100), "clock: '100' has no unit"),
    (lambda d: d["memory"]["dram"].update(bandwidth_per_channel="10 GB"),
     "memory.dram.bandwidth_per_channel: '10 GB' is not a bandwidth"),
    (lambda d: d.update(clock="0 MHz"), "must be greater than zero"),
    (lambda d: d.update(clock="-5 MHz"), "must be greater than zero"),
    (lambda d: d["cores"].update(count=0), "cores.count"),
    (lambda d: d["cores"].update(count=-1), "cores.count"),
    (lambda d: d["cores"].update(count="eight"), "cores.count"),
    (lambda d: d["memory"]["dram"].update(capacity="0 GiB"), "must be greater than zero"),
    (lambda d: d["cores"]["units"]["mac"].update(kind="quantum"), "cores.units.mac.kind"),
    (lambda d: d["power"]["op_energy"].pop("matrix"), "power.op_energy.matrix has no energy"),
])
def test_bad_fields_name_file_line_and_field(tmp_path: Path, machine_data: dict[str, Any],
                                             mutate: Any, fragment: str) -> None:
    mutate(machine_data)
    path = write(tmp_path, machine_data)
    with pytest.raises(UserError) as info:
        load_hardware(path)
    text = str(info.value)
    assert text.startswith(f"{path}:") and fragment in text
    assert "\n" not in text


def test_error_line_points_at_the_offending_key(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nclock: 1 GHz\ncores:\n  count: 1\n  sram: 1 KiB\n"
                           "  speed: 3\n")
    with pytest.raises(UserError, match=r"hw\.yaml:6: cores\.speed: unknown key"):
        load_hardware(path)


@pytest.mark.parametrize(("text", "fragment"), [
    ("name: [unclosed\n", "YAML syntax error"),
    ("- just\n- a list\n", "expected a YAML mapping"),
    ("!!python/object/apply:os.system ['true']\n", "YAML"),
    (ALIAS_BOMB, "expands to more than"),
])
def test_malformed_yaml(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        load_hardware(write(tmp_path, text))


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(UserError, match="not valid UTF-8"):
        load_hardware(path)


def test_unknown_hardware_name_lists_shipped() -> None:
    with pytest.raises(UserError, match=r"fpga_8core\.yaml"):
        load_hardware("fpga_9core.yaml")


@pytest.mark.parametrize(("override", "fragment"), [
    ({"memory.nope.x": 1}, "'memory.nope' is not a section"),
    ({"clock.x": 1}, "'clock' is not a section"),
    ({"cores..count": 1}, "dotted path"),
])
def test_bad_override_paths(override: dict[str, Any], fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        load_hardware("fpga_1core.yaml", override)
