"""Writing files a user asked for: whole or not at all (temp file + atomic rename).

A file the user names (-o, --trace, --baseline) goes into a folder that must exist: a
typo in the path is an error, not a new tree of folders. A folder the user names
(--plot DIR, sweep --out DIR) is created if its parent exists. Only the program's own
files (the trace cache) ask for missing parents to be made.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from simulator.errors import UserError


def _require_folder(folder: Path, where: str) -> None:
    if not folder.exists():
        raise UserError(where, f"folder {folder} does not exist; expected a path in an existing "
                               "folder (create it first)")
    if not folder.is_dir():
        raise UserError(where, f"{folder} is not a folder; expected a path in a folder")


def check_output_file(path: str | Path, flag: str) -> None:
    """Refuse, naming `flag`, a file to be written into a folder that does not exist."""
    _require_folder(Path(path).parent, f"{flag} {path}")


def check_output_folder(path: str | Path, flag: str) -> bool:
    """Refuse a folder to write into that is a file or whose parent does not exist;
    true if it exists already."""
    folder = Path(path)
    if folder.is_dir():
        return True
    if folder.exists():
        raise UserError(f"{flag} {path}", "is not a folder; expected a folder to write into")
    _require_folder(folder.parent, f"{flag} {path}")
    return False


def output_folder(path: str | Path, flag: str) -> Path:
    """The folder `path`, created if missing and its parent exists; refused otherwise."""
    folder = Path(path)
    if check_output_folder(folder, flag):
        return folder
    try:
        folder.mkdir()
    except OSError as exc:
        raise UserError(f"{flag} {path}", f"cannot create it ({exc.strerror})") from None
    return folder


def write_atomic(path: str | Path, text: str, flag: str = "-o", *,
                 make_parents: bool = False) -> None:
    """Write `text` to `path` atomically; a failure leaves any old file untouched.

    The folder must exist unless `make_parents` (for the program's own files, not a user's).
    """
    target = Path(path)
    if not make_parents:
        check_output_file(target, flag)
    try:
        if make_parents:
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
