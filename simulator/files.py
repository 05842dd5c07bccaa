"""Writing files a user asked for: whole or not at all (temp file + atomic rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from simulator.errors import UserError


def write_atomic(path: str | Path, text: str, flag: str = "-o") -> None:
    """Write `text` to `path` atomically; a failure leaves any old file untouched."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"{flag} {path}", f"cannot write there ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary open() would have made it
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{flag} {path}", f"cannot write there ({exc.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
