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

    def __reduce__(self) -> tuple:
        return type(self), (self.where, self.message)  # across processes (validate --jobs)


class Infeasible(UserError):
    """Well-formed input this machine cannot run (the model does not fit, a mapping it lacks):
    a sweep records such a point as infeasible rather than as an error."""


def first_error(errors: list[dict]) -> tuple[str, str]:
    """(dotted field, message) of the pydantic error to show: an unknown key first, since a
    misspelt key also makes its real name look missing."""
    error = min(errors, key=lambda e: e["type"] != "extra_forbidden")
    field = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
    if error["type"] == "extra_forbidden":
        return field or "(top level)", "unknown key (check its spelling)"
    return field or "(top level)", str(error["msg"]).removeprefix("Value error, ")
