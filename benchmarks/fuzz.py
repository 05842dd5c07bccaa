"""The long fuzz run (≥ 5,000 mutated hardware files): python benchmarks/fuzz.py [N]."""

import os
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":
    os.environ["FUZZ_EXAMPLES"] = sys.argv[1] if len(sys.argv) > 1 else "5000"
    tests = Path(__file__).resolve().parents[1] / "tests" / "test_fuzz.py"
    sys.exit(pytest.main([str(tests), "-k", "mutated", "-p", "no:cacheprovider"]))
