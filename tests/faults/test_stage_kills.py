"""kill -9 of `arpipe run` at seeded random moments, for every stage kind; then a killed Ray worker.

The kinds and their groups are in ``kinds.py``, the machinery in ``harness.py``: one campaign
per group of kinds whose stages run side by side in one pipeline, the campaigns themselves side
by side on the suite's own Ray instance, started in the background by the suite's first test:
kills of each kind's stage (``CI_KILLS``, the first of the seeded sequence, in `make test`;
``FULL_KILLS`` in the tests marked ``full``, `make test-full`), then a final run that loses a Ray
worker of each mid-work. Afterwards the outputs must equal an undisturbed run's, no uncommitted
output may ever have been trusted, committed units must have survived every kill untouched,
and no kill may cost more than the unit it cut off.
"""

from __future__ import annotations

import pytest

from faults.kinds import CI_KILLS, FULL_KILLS, KINDS
from faults.tally import TALLY


def check_campaign(handle, kind: str, kills: int) -> None:
    """The campaign of ``kind``'s group ended, with ``kills`` kills of it and every promise kept."""
    handle.thread.join(timeout=840)
    assert handle.error is None, handle.error
    result = handle.campaign.result
    report = result.report(kind)
    print(report)
    assert not handle.thread.is_alive(), f"the {kind} campaign did not finish\n{report}"
    assert not result.problems, report
    assert result.kills(kind) >= kills, report
    assert not result.attempt_problems(kind), report
    assert result.worker_killed.get(kind), report
    assert not result.final_problems.get(kind), report
    assert not result.leaks, f"credentials from the environment leaked: {result.leaks}"


def tally(handle, kind: str) -> None:
    """Count the campaign's faults once per session (the CI and full tests read the same campaign)."""
    result = handle.campaign.result if handle.campaign else None
    if result is None or kind in TALLY.campaigns_counted:
        return
    TALLY.campaigns_counted.add(kind)
    final_ok = not handle.thread.is_alive() and not result.problems and not result.final_problems.get(kind)
    for attempt in result.attempts:
        hit = attempt.hits[kind]
        if attempt.sent and hit.killed:
            TALLY.fault(f"kill -9 driver ({kind})", survived=final_ok and not hit.problems)
    if result.worker_killed.get(kind):
        TALLY.fault(f"kill -9 Ray worker ({kind})", survived=final_ok)
    if kind == result.kinds[0]:   # once per campaign: its kinds share the folder and the output
        TALLY.leaks(len(result.leaks))


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("kills", [pytest.param(CI_KILLS, id="subset"),
                                   pytest.param(FULL_KILLS, id="full", marks=pytest.mark.full)])
@pytest.mark.parametrize("kind", [k.kind for k in KINDS])
def test_kill_9_at_random_moments_then_a_killed_worker(kill_campaigns, kind, kills):
    """`kills` kills of each kind (the seeded subset in CI, the full campaign behind the `full` marker), then a
    killed Ray worker; the outputs equal an undisturbed run's."""
    handle = kill_campaigns[kind]
    try:
        check_campaign(handle, kind, kills)
    finally:
        tally(handle, kind)
