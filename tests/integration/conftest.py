"""Shared fixtures for integration tests with real Debian peers.

Each fixture starts one peer from tests/integration/realpeers.py in the
test's tmp_path and stops it (by pid) in teardown.  A missing program or
missing root skips the test, or fails it under MAILWALL_REQUIRE_REAL=1.
"""

import pytest

from tests.integration import realpeers


@pytest.fixture
def rsyslog(tmp_path):
    """rsyslogd on a private socket: .socket, .read(), .wait_for(pattern)."""
    realpeers.require("rsyslogd")
    with realpeers.Rsyslog(tmp_path / "rsyslog") as peer:
        yield peer


@pytest.fixture
def smtp_sink(tmp_path):
    """smtp-sink on 127.0.0.1:.port storing messages: .messages(),
    .dumps(), .wait_count(n)."""
    realpeers.require("smtp-sink")
    with realpeers.SmtpSink(tmp_path / "smtp-sink") as peer:
        yield peer


@pytest.fixture
def postfix(tmp_path, smtp_sink):
    """A private Postfix relaying to the smtp_sink fixture:
    .sendmail_argv(), .sendmail(), .flush(), .maillog()."""
    realpeers.require("postfix", "postconf", "sendmail")
    realpeers.require_root()
    with realpeers.Postfix(tmp_path / "postfix", smtp_sink.port) as peer:
        yield peer


@pytest.fixture
def dovecot(tmp_path):
    """Dovecot POP3 with APOP on 127.0.0.1:.port, user alice/alicesecret:
    .deliver(user, message)."""
    realpeers.require("dovecot")
    realpeers.require_root()
    with realpeers.Dovecot(tmp_path / "dovecot") as peer:
        yield peer
