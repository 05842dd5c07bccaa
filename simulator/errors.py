"""The one error a user ever sees: a single line naming where and what was expected."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit status 2.

    `where` names the file (with line), flag or field; `message` says what was expected.
    """

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message
