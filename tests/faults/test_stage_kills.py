"""kill -9 of `arpipe run` at seeded random moments, for every stage kind; then a killed Ray worker.

The kinds and their groups are in ``kinds.py``, the machinery in ``harness.py``: one campaign
per group of kinds whose stages run side by side in one pipeline, the campaigns themselves side
by side on the suite's own Ray instance, started in the background by the suite's first test:
>= 10 kills of each kind's stage, then a final run that loses a Ray worker of each mid-work. Afterwards the outputs
must equal an undisturbed run's, no uncommitted output may ever have been trusted, committed
units must have survived every kill untouched, and no kill may cost more than the unit it cut off.
"""

from __future__ import annotations

import pytest

from faults.kinds import KINDS
from faults.tally import TALLY


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", [k.kind for k in KINDS])
def test_kill_9_at_random_moments_then_a_killed_worker(kill_campaigns, kind):
    handle = kill_campaigns[kind]
    handle.thread.join(timeout=840)
    assert handle.error is None, handle.error
    campaign = handle.campaign
    result = campaign.result
    final_ok = not handle.thread.is_alive() and not result.problems and not result.final_problems.get(kind)
    for attempt in result.attempts:
        hit = attempt.hits[kind]
        if attempt.sent and hit.killed:
            TALLY.fault(f"kill -9 driver ({kind})", survived=final_ok and not hit.problems)
    if result.worker_killed.get(kind):
        TALLY.fault(f"kill -9 Ray worker ({kind})", survived=final_ok)
    if kind == result.kinds[0]:   # once per campaign: its kinds share the folder and the output
        TALLY.leaks(len(result.leaks))
    report = result.report(kind)
    print(report)
    assert not handle.thread.is_alive(), f"the {kind} campaign did not finish\n{report}"
    assert not result.problems, report
    assert result.kills(kind) >= 10, report
    assert not result.attempt_problems(kind), report
    assert result.worker_killed.get(kind), report
    assert not result.final_problems.get(kind), report
    assert not result.leaks, f"credentials from the environment leaked: {result.leaks}"
