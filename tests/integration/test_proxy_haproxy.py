"""Behind a real HAProxy (issue 16 item 1): Debian's haproxy, started once
for the module with a private TCP configuration, balances two `smap
--daemon`s (each with its own spool) and two `pop3-gw --daemon`s (in front
of one Dovecot) with `send-proxy` (v1) and `send-proxy-v2`, connecting to
them from 127.0.0.8, the only `proxy-hosts` address.  Clients bind to
different 127.0.0.x addresses: deny-hosts and permit-relay are decided on
the client's address from the header, the logs say `addr=CLIENT
proxy=127.0.0.8`, and a header from a host not in proxy-hosts is refused
(as is a listed host that sends none)."""

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from common import apop, spool
from tests.integration import realpeers
from tests.integration.pop3_helpers import Client, Daemon, LogCatcher, Setup
from tests.integration.smap_helpers import SmtpClient, make_spool, smap_program, write_table

pytestmark = pytest.mark.integration

LB = "127.0.0.8"
DENIED = "127.0.0.66"
RELAY = "127.0.0.5"
CLIENT = "127.0.0.3"
V1_FORGED = b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 25\r\n"
V2_FORGED = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + socket.inet_aton(RELAY)
             + socket.inet_aton("127.0.0.1") + b"\x9c\x40\x00\x19")


class SmapDaemon:
    def __init__(self, root, table, host="127.0.0.1"):
        self.host = host
        self.port = realpeers.free_port(host)
        self.proc = realpeers.Proc(
            [smap_program(), "--daemon", realpeers.host_port(host, self.port), "-F", "-c", table],
            new_session=True, log=Path(root) / ("smap-%d.out" % self.port))
        try:
            realpeers.wait_for_listen(host, self.port, 15)
        except Exception:
            self.proc.stop()
            raise AssertionError("smap --daemon did not listen: %s" % self.proc.output())

    def stop(self):
        self.proc.stop()


class Site:
    """Everything the module's tests share; stopped in reverse order."""

    def __init__(self):
        self.stack = []
        self.root = Path(tempfile.mkdtemp(prefix="mw-proxy-"))
        os.chmod(self.root, 0o755)

    def keep(self, thing):
        self.stack.append(thing)
        return thing

    def stop(self):
        while self.stack:
            thing = self.stack.pop()
            try:
                (thing.stop if hasattr(thing, "stop") else thing.close)()
            except Exception:     # noqa: BLE001  (tear-down goes on)
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def site():
    realpeers.require_root()
    realpeers.require("haproxy", "dovecot")
    made = Site()
    try:
        root = made.root
        made.smap_log = made.keep(LogCatcher(root / "smap-log.sock"))
        made.spools = [make_spool(root / "spool1"), make_spool(root / "spool2")]
        made.smaps = []
        for number, directory in enumerate(made.spools, 1):
            table = write_table(root / ("smap-table%d" % number), directory,
                                "smap: proxy-hosts %s" % LB, "smap: deny-hosts %s" % DENIED,
                                "smap: permit-hosts *", "smap: permit-relay %s" % RELAY,
                                logsocket=made.smap_log.path)
            made.smaps.append(made.keep(SmapDaemon(root, table)))
        made.dovecot = made.keep(realpeers.Dovecot(root / "dovecot"))
        made.setups, made.gateways = [], []
        for number in (1, 2):
            setup = Setup(root / ("gw%d" % number), "127.0.0.1:%d" % made.dovecot.port,
                          rules=("deny-hosts %s" % DENIED, "permit-hosts 127.0.0.0/8"),
                          extra=("pop3-gw: proxy-hosts %s" % LB, "pop3-gw: maxbad 2"))
            made.keep(setup.log)
            made.setups.append(setup)
            made.gateways.append(made.keep(Daemon(setup)))
        smtp = [("127.0.0.1", s.port) for s in made.smaps]
        pop = [("127.0.0.1", g.port) for g in made.gateways]
        made.haproxy = made.keep(realpeers.HAProxy(root / "haproxy", {
            "smtp_v1": ("127.0.0.1", smtp, "send-proxy"),
            "smtp_v2": ("127.0.0.1", smtp, "send-proxy-v2"),
            # health checks, as conf/haproxy.cfg has them: a v2 LOCAL header
            "smtp_check": ("127.0.0.1", smtp, "send-proxy-v2", "check inter 1s"),
            "smtp_v6": ("::1", smtp, "send-proxy"),
            "pop_v1": ("127.0.0.1", pop, "send-proxy"),
            "pop_v2": ("127.0.0.1", pop, "send-proxy-v2"),
            "pop_check": ("127.0.0.1", pop, "send-proxy", "check inter 1s"),
        }, source=LB))
    except BaseException:
        made.stop()
        raise
    yield made
    made.stop()


def smtp_via(site, frontend, source):
    host = "::1" if frontend == "smtp_v6" else "127.0.0.1"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((source, 0))
    sock.settimeout(20)
    sock.connect((host, site.haproxy.ports[frontend]))
    return SmtpClient(sock)


def queued(site):
    """Every queued message of both spools: [(spool number, envelope, message)]."""
    found = []
    for number, directory in enumerate(site.spools, 1):
        for name in spool.queued(str(directory)):
            envelope, message = spool.read_message(str(directory / spool.QUEUE / name))
            found.append((number, envelope, message))
    return found


def one_message(client, rcpt=b"user@example.org", subject=b"x"):
    assert client.reply().startswith(b"220 ")
    assert client.command(b"EHLO client.example.net\r\n").startswith(b"250")
    assert client.command(b"MAIL FROM:<sender@example.net>\r\n") == b"250 2.1.0 Ok\r\n"
    reply = client.command(b"RCPT TO:<%s>\r\n" % rcpt)
    if not reply.startswith(b"250"):
        client.command(b"QUIT\r\n")
        return reply
    assert client.command(b"DATA\r\n").startswith(b"354 ")
    reply = client.command(b"Subject: %s\r\n\r\nhello\r\n.\r\n" % subject)
    client.command(b"QUIT\r\n")
    return reply


@pytest.mark.parametrize("frontend", ["smtp_v1", "smtp_v2"])
def test_smtp_through_haproxy_is_the_client_address_in_both_spools(site, frontend):
    before = {id_of(e) for _, e, _ in queued(site)}
    subject = b"via-" + frontend.encode()
    for _ in range(2):          # round robin: one message to each smap
        client = smtp_via(site, frontend, CLIENT)
        assert one_message(client, subject=subject).startswith(b"250 2.0.0 Ok: queued as ")
        client.close()
    new = [(number, e, m) for number, e, m in queued(site) if id_of(e) not in before]
    assert sorted(number for number, _, _ in new) == [1, 2]
    for _, envelope, message in new:
        assert envelope["client-addr"] == CLIENT
        assert message.startswith(b"Received: from client.example.net (")
        assert (b" [%s])" % CLIENT.encode()) in message.split(b"\r\n")[0]
    line = site.smap_log.wait_for(r"connect host=\S+ addr=%s proxy=%s" % (CLIENT, LB))
    assert "proxy=%s" % LB in line
    site.smap_log.wait_for(r"message id=%s .*proxy=%s" % (new[0][1]["id"], LB))


def id_of(envelope):
    return envelope["id"]


def test_smtp_ipv6_client_through_haproxy_gets_an_ipv6_literal(site):
    client = smtp_via(site, "smtp_v6", "::1")
    assert one_message(client, subject=b"ipv6").startswith(b"250 2.0.0 Ok: queued as ")
    client.close()
    [(_, envelope, message)] = [(n, e, m) for n, e, m in queued(site)
                                if b"Subject: ipv6" in m]
    assert envelope["client-addr"] == "::1"
    assert b"[IPv6:::1])" in message.split(b"\r\n")[0]
    site.smap_log.wait_for(r"connect host=\S+ addr=::1 proxy=%s" % LB)


@pytest.mark.parametrize("frontend", ["smtp_v1", "smtp_v2"])
def test_deny_hosts_is_decided_on_the_client_behind_haproxy(site, frontend):
    client = smtp_via(site, frontend, DENIED)
    assert client.reply().startswith(b"554 5.7.1 ")
    client.close()
    site.smap_log.wait_for(r"deny host=\S+ addr=%s .*proxy=%s" % (DENIED, LB))


@pytest.mark.parametrize("frontend", ["smtp_v1", "smtp_v2"])
def test_permit_relay_is_decided_on_the_client_behind_haproxy(site, frontend):
    client = smtp_via(site, frontend, CLIENT)
    assert one_message(client, rcpt=b"far@example.com").startswith(b"554 5.7.1 <far@example.com>: Relay access denied")
    client.close()
    client = smtp_via(site, frontend, RELAY)
    assert one_message(client, rcpt=b"far@example.com", subject=b"relayed") \
        .startswith(b"250 2.0.0 Ok: queued as ")
    client.close()
    assert any(e["client-addr"] == RELAY and e["rcpt"] == ["far@example.com"]
               for _, e, _ in queued(site))


@pytest.mark.parametrize("header", [V1_FORGED, V2_FORGED], ids=["v1", "v2"])
def test_a_forged_header_from_a_host_not_in_proxy_hosts_is_refused(site, header):
    """A client straight at smap claims to be the relay host 127.0.0.5."""
    count = len(queued(site))
    sock = socket.socket()
    sock.bind((CLIENT, 0))
    sock.settimeout(20)
    sock.connect(("127.0.0.1", site.smaps[0].port))
    sock.sendall(header + b"EHLO client.example.net\r\n")
    client = SmtpClient(sock)
    reply = client.reply()
    if reply.startswith(b"220 "):       # the header came after the check for early talk
        reply = client.reply()
    assert reply.startswith(b"554 "), reply
    client.close()
    line = site.smap_log.wait_for(r"reject addr=%s reason=.*PROXY" % CLIENT)
    assert "not in proxy-hosts" in line
    assert len(queued(site)) == count


def test_a_proxy_host_without_a_header_is_refused(site):
    sock = socket.socket()
    sock.bind((LB, 0))
    sock.settimeout(20)
    sock.connect(("127.0.0.1", site.smaps[1].port))
    sock.sendall(b"EHLO lb.example\r\n")
    client = SmtpClient(sock)
    assert client.reply().startswith(b"421 4.7.0 ")
    client.close()
    site.smap_log.wait_for(r"reject addr=%s proxy=%s reason=\"bad PROXY header" % (LB, LB))


# -- pop3-gw ------------------------------------------------------------------------------
def pop_via(site, frontend, source):
    return Client(site.haproxy.ports[frontend], source=source)


def gateway_logs(site, pattern):
    """The first line matching in either gateway's log (one of them got it)."""
    for _ in range(100):
        for setup in site.setups:
            try:
                return setup.log.wait_for(pattern, timeout=0.1)
            except AssertionError:
                pass
    raise AssertionError("%r in neither gateway's log" % pattern)


@pytest.mark.parametrize("frontend", ["pop_v1", "pop_v2"])
def test_pop3_through_haproxy_logs_in_and_logs_the_client(site, frontend):
    for _ in range(2):      # one session on each gateway
        client = pop_via(site, frontend, CLIENT)
        greeting = client.line()
        assert greeting.startswith(b"+OK")
        assert client.apop("alice", "alicesecret", greeting).startswith(b"+OK")
        assert client.command(b"STAT").startswith(b"+OK")
        assert client.command(b"QUIT").startswith(b"+OK")
        client.close()
    for setup in site.setups:
        line = setup.log.wait_for(r"login host=\S+ addr=%s .*user=alice .*proxy=%s"
                                  % (CLIENT, LB))
        assert "addr=%s" % CLIENT in line


@pytest.mark.parametrize("frontend", ["pop_v1", "pop_v2"])
def test_pop3_deny_hosts_is_decided_on_the_client_behind_haproxy(site, frontend):
    client = pop_via(site, frontend, DENIED)
    assert client.line().startswith(b"-ERR [SYS/PERM] access denied")
    client.close()
    gateway_logs(site, r"deny host=\S+ addr=%s .*proxy=%s" % (DENIED, LB))


@pytest.mark.parametrize("header", [V1_FORGED, V2_FORGED], ids=["v1", "v2"])
def test_pop3_forged_header_from_a_host_not_in_proxy_hosts_is_refused(site, header):
    client = Client(site.gateways[0].port, source=CLIENT)
    greeting = client.line()
    assert greeting.startswith(b"+OK")
    client.send(header + b"APOP alice %s\r\n"
                % apop.digest(apop.find_timestamp(greeting), "alicesecret").encode())
    assert client.line().startswith(b"-ERR PROXY protocol header not accepted")
    assert client.closed()
    line = site.setups[0].log.wait_for(r"refuse addr=%s reason=.*PROXY" % CLIENT)
    assert "not in proxy-hosts" in line


def test_pop3_proxy_host_without_a_header_is_refused(site):
    client = Client(site.gateways[1].port, source=LB)
    client.send(b"CAPA\r\n")
    assert client.line().startswith(b"-ERR [SYS/TEMP] PROXY protocol header expected")
    site.setups[1].log.wait_for(r"deny addr=%s proxy=%s reason=\"bad PROXY header" % (LB, LB))


def test_health_checks_are_the_load_balancer_itself(site):
    """A health check's header (v2 LOCAL, v1 UNKNOWN) makes the session the
    balancer's own, not a missing header.  Sent here from the balancer's
    address on a connection kept open: HAProxy's own checks close at once,
    often before the session process has even looked at its peer."""
    local_v2 = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    for header in (local_v2, b"PROXY UNKNOWN\r\n"):
        sock = direct_from_lb(site.smaps[0].port)
        sock.sendall(header)
        client = SmtpClient(sock)
        assert client.reply().startswith(b"220 "), header
        assert client.command(b"QUIT\r\n").startswith(b"221")
        client.close()
        for gateway in site.gateways:
            sock = direct_from_lb(gateway.port)
            sock.sendall(header)
            sock.settimeout(20)
            assert sock.recv(512).startswith(b"+OK "), header
            sock.sendall(b"QUIT\r\n")
            assert sock.recv(512).startswith(b"+OK")
            sock.close()
    site.smap_log.wait_for(r"connect host=\S+ addr=%s proxy=%s" % (LB, LB))
    gateway_logs(site, r"connect host=\S+ addr=%s proxy=%s" % (LB, LB))
    assert not [line for line in site.smap_log.lines() if "bad PROXY header" in line
                and "connection closed" in line]


def test_the_example_configuration_is_valid(site):
    example = Path(__file__).resolve().parents[2] / "conf" / "haproxy.cfg"
    checked = realpeers._run([realpeers._bin("haproxy"), "-c", "-f", example], check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = example.read_text()
    assert "send-proxy-v2" in text and "source " in text


def direct_from_lb(port):
    sock = socket.socket()
    sock.bind((LB, 0))
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port))
    return sock


def test_the_header_is_not_early_talk_but_the_client_bytes_after_it_are(site):
    """One write of a good header and an EHLO sent before the banner: the
    header is taken, the EHLO is the client's talk before the greeting."""
    sock = direct_from_lb(site.smaps[0].port)
    sock.sendall(b"PROXY TCP4 127.0.0.44 127.0.0.1 40000 25\r\nEHLO early.example\r\n")
    client = SmtpClient(sock)
    assert client.reply().startswith(b"554 5.5.0 Protocol error: talked before the greeting")
    client.close()
    site.smap_log.wait_for(r"reject addr=127\.0\.0\.44 reason=\"talked before the banner\" "
                           r"proxy=%s" % LB)
    sock = direct_from_lb(site.smaps[0].port)
    sock.sendall(b"PROXY TCP4 127.0.0.45 127.0.0.1 40000 25\r\n")
    client = SmtpClient(sock)
    assert client.reply().startswith(b"220 ")
    assert client.command(b"QUIT\r\n").startswith(b"221")
    client.close()


def test_pop3_client_bytes_after_the_header_reach_the_session_unchanged(site):
    sock = direct_from_lb(site.gateways[0].port)
    sock.sendall(V2_FORGED.replace(socket.inet_aton(RELAY), socket.inet_aton("127.0.0.46"))
                 + b"CAPA\r\n")
    data = b""
    while data.count(b"\r\n.\r\n") < 1:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    sock.close()
    assert data.startswith(b"+OK mailwall pop3-gw ready <")
    assert b"\r\n+OK Capability list follows\r\n" in data
    site.setups[0].log.wait_for(r"connect host=\S+ addr=127\.0\.0\.46 proxy=%s" % LB)


def login_claiming(site, source, secret):
    """An APOP login to the second gateway, from the balancer's address,
    with a v1 header naming `source` as the client."""
    sock = direct_from_lb(site.gateways[1].port)
    sock.sendall(b"PROXY TCP4 %s 127.0.0.1 40000 110\r\n" % source.encode())
    client = Client.__new__(Client)
    Client.opened.append(client)
    client.sock, client.buffer = sock, b""
    greeting = client.line()
    reply = client.apop("alice", secret, greeting)
    client.close()
    return reply


def test_pop3_bad_logins_count_for_the_client_behind_the_balancer_not_for_all(site):
    """maxbad 2: the client named in the header is refused after its bad
    logins, another client of the same balancer is not."""
    for _ in range(2):
        assert login_claiming(site, "127.0.0.50", "wrong").startswith(b"-ERR [AUTH]")
    assert login_claiming(site, "127.0.0.50", "alicesecret").startswith(b"-ERR [AUTH]")
    site.setups[1].log.wait_for(r"auth-fail .*addr=127\.0\.0\.50 .*source refused")
    assert login_claiming(site, "127.0.0.51", "alicesecret").startswith(b"+OK")
