"""Running the CLI in a test and reading its one-line refusals."""

from __future__ import annotations

import pytest

from simulator.cli import main


def refused(capsys: pytest.CaptureFixture[str], args: list[str], *fragments: str) -> str:
    """Run the CLI; assert exit 2 and one stderr line holding every fragment."""
    code = main(args)
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, err
    assert captured.out == "", captured.out
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("simulate: error: ")
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err
