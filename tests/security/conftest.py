"""Fixtures of the security tests: the real-peer fixtures of
tests/integration (rsyslog, smtp-sink, Postfix, Dovecot), shared as they are."""

from tests.integration.conftest import dovecot, postfix, rsyslog, smtp_sink  # noqa: F401
