"""hwconfigs/ ships inside the wheel and is found by bare file name from an installed copy."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_hwconfigs_and_finds_them_by_name(tmp_path: Path) -> None:
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(source)],
                   check=True, timeout=300, cwd=tmp_path)
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hwconfigs/fpga_8core.yaml" in names and "simulator/cli.py" in names
    assert "workloads/hgrn_bit.py" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    probe = ("import simulator, hwconfigs; from simulator.hardware import load_hardware; "
             "print(simulator.__file__); print(hwconfigs.__file__); "
             "print(load_hardware('fpga_8core.yaml').name)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, cwd=tmp_path, check=True, timeout=120).stdout.splitlines()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target))
    assert out[2] == "d5005-mmfree-8core"
