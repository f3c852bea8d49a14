"""Errors a user sees: one line naming where, what is wrong and how to fix it.

The CLI prints ``str(err)`` of an :class:`ArpipeError` and exits with its
``exit_code`` (2 for user errors); a traceback only with ``--debug``.
"""

from __future__ import annotations


class ArpipeError(Exception):
    """An error whose message is meant for the user as it is."""

    exit_code = 1


class UserError(ArpipeError):
    """Bad input from the user (pipeline file, override, data, CLI argument): exit code 2.

    ``where`` is the location (``file:line:col`` or a file/URI), ``path`` the
    dotted path inside it, ``fix`` what to do about it.
    """

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, path: str | None = None, fix: str | None = None):
        self.what, self.where, self.path, self.fix = what, where, path, fix
        super().__init__(self.render())

    def render(self) -> str:
        head = ": ".join(p for p in (self.where, self.path) if p)
        line = f"{head}: {self.what}" if head else self.what
        if self.fix:
            line = f"{line.rstrip('.')}; {self.fix}"
        return " ".join(line.split())


class StageFailed(ArpipeError):
    """One or more stages failed; the message names them."""

    exit_code = 1
