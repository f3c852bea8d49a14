"""The reliability suite's counters, printed as one line at the end of the test session.

Tests under ``tests/faults`` add to :data:`TALLY`; ``tests/faults/conftest.py`` prints it.
A fault counts as survived only when every check attributed to it passed; a bad input
counts as handled only when it gave its one-line error or was quarantined with its reason.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Tally:
    faults_injected: int = 0
    faults_survived: int = 0
    bad_tried: int = 0
    bad_handled: int = 0
    secrets_leaked: int = 0
    #: what was injected, by class ("kill -9 driver (train)": 11, ...), for the detailed summary
    by_fault: dict[str, int] = field(default_factory=dict)
    #: kinds whose kill campaign is counted already (two tests may read one campaign)
    campaigns_counted: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fault(self, what: str, survived: bool) -> None:
        with self._lock:
            self.faults_injected += 1
            self.faults_survived += int(survived)
            self.by_fault[what] = self.by_fault.get(what, 0) + 1

    def bad_input(self, handled: bool) -> None:
        with self._lock:
            self.bad_tried += 1
            self.bad_handled += int(handled)

    def leaks(self, count: int) -> None:
        with self._lock:
            self.secrets_leaked += count

    @property
    def used(self) -> bool:
        return bool(self.faults_injected or self.bad_tried or self.secrets_leaked)

    def line(self) -> str:
        return (f"arpipe reliability: faults injected {self.faults_injected} / survived {self.faults_survived}, "
                f"bad inputs tried {self.bad_tried} / handled {self.bad_handled}, "
                f"secrets leaked {self.secrets_leaked}")


TALLY = Tally()
