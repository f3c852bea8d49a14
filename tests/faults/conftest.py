"""Hooks of the fault and bad-input suite: its marker and its one-line summary at the end of the session.

Its fixtures (the suite's own Ray instance, the prepared digits, tokenizer, store and model, and
the kill campaigns) are in ``faults/fixtures.py``, registered for the whole session by
``tests/conftest.py`` so that the campaigns can start with the session's first test.
"""

from __future__ import annotations

from faults.tally import TALLY


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "full: the full fault campaigns (make test-full); CI runs a seeded subset")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not TALLY.used:
        return
    terminalreporter.write_sep("-", "fault and bad-input suite")
    if TALLY.by_fault and config.option.verbose > 0:
        detail = ", ".join(f"{what}: {n}" for what, n in sorted(TALLY.by_fault.items()))
        terminalreporter.write_line(f"faults by class: {detail}")
    terminalreporter.write_line(TALLY.line())
