"""The short CI version of `make soak`: three fault-injection trials through
the real smap, smapd and Postfix (see tests/soak/soak.py): kill -9 of smap
right after its "250", kill -9 of smapd's delivery agent mid-delivery, and
an MTA that answers EX_TEMPFAIL for a while.  Every message that got "250"
must be delivered, bounced or quarantined afterwards, and duplicates may
appear only where the kill can fall between the MTA's success and the
spool file's removal."""

import pytest

from tests.integration import realpeers
from tests.soak import soak

pytestmark = pytest.mark.integration


def test_three_faults_lose_nothing():
    realpeers.require_root()
    realpeers.require("postfix", "postconf", "sendmail", "smtp-sink")
    lines = []
    stats = soak.run(3, seed=7, kinds=["smap-after-250", "agent", "mta-75"], log=lines.append)
    report = "\n".join(lines + [stats.line()] + stats.problems)
    assert stats.trials == 3, report
    assert stats.acknowledged >= 9, report          # at least three messages a trial
    assert stats.lost == 0, report
    assert stats.bad_duplicates == 0, report
    assert not stats.problems, report
    assert stats.delivered + stats.bounced + stats.quarantined == stats.acknowledged, report
