"""Issue 11, finding 8: addresses that hide an option, a program or a file
behind a spelling, and domains with an empty label.

The review sent `MAIL FROM:<" -oQ/tmp"@b.org>` and
`RCPT TO:<" |/bin/sh"@yoyodyne.com>`: smap looked only at the first
character inside the quotes, a space, and accepted both; `u@yoyodyne.com..`
passed too.  The rule now (common.address): the local part, unquoted and
stripped of white space, must not start with `-`, `|` or `/`, must not be
empty, and no label of the domain may be empty (a trailing dot included).

These tests run the real smap, in inetd mode over a socketpair (the peer is
an outside host) and as `smap --daemon`, and check what a client sees (a
5xx at MAIL or RCPT), what smap logs (the reason) and what is spooled
(nothing).  The ordinary addresses next to them still get through.
"""

import pytest

from tests.security.harness import SmapSetup, queue_id_of, send_message

# (address, the reason smap logs)
HIDDEN_LOCAL_PARTS = [
    ('" -oQ/tmp"@example.com', "local part starts with -"),
    ('" |/bin/sh"@example.com', "local part starts with |"),
    ('"   /etc/passwd"@example.com', "local part starts with /"),
    ('" -be"@example.com', "local part starts with -"),
    ('" "@example.com', "empty local part"),
    ('"   "@example.com', "empty local part"),
]
EMPTY_LABELS = [
    ("u@example.com..", "empty label in domain"),
    ("u@example..com", "empty label in domain"),
    ("u@.example.com", "empty label in domain"),
    ("u@example.com.", "empty label in domain"),
]
# the review's exact sender, and the same tricks as senders
HOSTILE_SENDERS = [
    ('" -oQ/tmp"@b.org', "local part starts with -"),
    ('" |/bin/sh"@b.org', "local part starts with |"),
    ('" "@b.org', "empty local part"),
    ("u@b.org..", "empty label in domain"),
    ("u@b.org.", "empty label in domain"),
]
# Ordinary addresses that must keep working next to the refusals.
ORDINARY_RECIPIENTS = ['"john smith"@example.com', "o'brien@example.com", "a-b@example.com",
                       "a|b@example.com", "Postmaster@EXAMPLE.COM"]
ORDINARY_SENDERS = ["x@[127.0.0.1]", "x@[IPv6:::1]", '"john smith"@b.org', "o'brien@x.org"]


@pytest.fixture
def smap(tmp_path):
    setup = SmapSetup(tmp_path)
    yield setup
    setup.stop()


def reject_logged(smap, reason):
    line = smap.logs.wait_for(reason)
    assert "reject" in line, line
    return line


@pytest.mark.parametrize("rcpt,reason", HIDDEN_LOCAL_PARTS + EMPTY_LABELS)
def test_inetd_smap_refuses_hidden_recipients(smap, rcpt, reason):
    client = smap.inetd()
    assert client.reply()[0] == 220
    assert client.cmd("EHLO a.example.org")[0] == 250
    assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250
    code, text = client.cmd("RCPT TO:<%s>" % rcpt)
    assert 500 <= code < 600, "%r accepted: %s" % (rcpt, text)
    assert reason in text, text
    assert client.cmd("DATA")[0] >= 500
    assert client.cmd("QUIT")[0] == 221
    assert smap.wait_exit(client) == 0
    assert "recipient " + reason in reject_logged(smap, "recipient " + reason)
    assert smap.queued() == [] and smap.tmp_files() == []


@pytest.mark.parametrize("sender,reason", HOSTILE_SENDERS)
def test_inetd_smap_refuses_hidden_senders(smap, sender, reason):
    client = smap.inetd()
    assert client.reply()[0] == 220
    assert client.cmd("EHLO a.example.org")[0] == 250
    code, text = client.cmd("MAIL FROM:<%s>" % sender)
    assert 500 <= code < 600, "%r accepted: %s" % (sender, text)
    assert reason in text, text
    # no transaction was opened: RCPT and DATA have nothing to attach to
    assert client.cmd("RCPT TO:<v@example.com>")[0] == 503
    assert client.cmd("DATA")[0] >= 500
    assert client.cmd("QUIT")[0] == 221
    assert smap.wait_exit(client) == 0
    reject_logged(smap, "sender " + reason)
    assert smap.queued() == [] and smap.tmp_files() == []


def test_daemon_smap_refuses_them_all_and_spools_only_the_ordinary_message(smap):
    _, port = smap.daemon()
    # each hostile address on a connection of its own (ten errors end a session)
    for sender, reason in HOSTILE_SENDERS:
        client = smap.connect(port)
        assert client.reply()[0] == 220
        assert client.cmd("EHLO a.example.org")[0] == 250
        code, text = client.cmd("MAIL FROM:<%s>" % sender)
        assert 500 <= code < 600 and reason in text, (sender, text)
        assert client.cmd("QUIT")[0] == 221
    for rcpt, reason in HIDDEN_LOCAL_PARTS + EMPTY_LABELS:
        client = smap.connect(port)
        assert client.reply()[0] == 220
        assert client.cmd("EHLO a.example.org")[0] == 250
        assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250
        code, text = client.cmd("RCPT TO:<%s>" % rcpt)
        assert 500 <= code < 600 and reason in text, (rcpt, text)
        assert client.cmd("DATA")[0] >= 500
        assert client.cmd("QUIT")[0] == 221
    for _, reason in HOSTILE_SENDERS:
        reject_logged(smap, "sender " + reason)
    for _, reason in HIDDEN_LOCAL_PARTS + EMPTY_LABELS:
        reject_logged(smap, "recipient " + reason)
    assert smap.queued() == []
    # the same daemon still takes an ordinary message with ordinary spellings
    client = smap.connect(port)
    code, text = send_message(client, "x@[IPv6:::1]", ORDINARY_RECIPIENTS,
                              b"Subject: ordinary\r\n\r\nbody\r\n")
    assert code == 250, text
    queue_id = queue_id_of(text)
    assert client.cmd("QUIT")[0] == 221
    assert smap.queued() == [queue_id]
    envelope = smap.message(queue_id)[0]
    assert envelope["sender"] == "x@[IPv6:::1]"
    assert envelope["rcpt"] == ORDINARY_RECIPIENTS


@pytest.mark.parametrize("sender", ORDINARY_SENDERS)
def test_inetd_smap_still_takes_ordinary_addresses(smap, sender):
    client = smap.inetd()
    code, text = send_message(client, sender, ORDINARY_RECIPIENTS,
                              b"Subject: ordinary\r\n\r\nbody\r\n")
    assert code == 250, text
    queue_id = queue_id_of(text)
    assert client.cmd("QUIT")[0] == 221
    assert smap.queued() == [queue_id]
    envelope = smap.message(queue_id)[0]
    assert (envelope["sender"], envelope["rcpt"]) == (sender, ORDINARY_RECIPIENTS)
