"""Content scanning's cost (issue 15): smap and Postfix through the same clamav-milter.

- intake: smtp-source against smap --daemon with `smap: milters` and
  against Postfix's smtpd with `smtpd_milters` (discard transport), both
  asking one clamav-milter (clamd with a one-signature database, as in the
  tests); -s 1 and -s 10, 5 KB, a new connection per message.
- end of data: the time from the final dot to the reply, one connection,
  message after message, with and without the milter, for smap --daemon
  and Postfix smtpd: the difference is what the end-of-data exchange (the
  scan included) adds.

The servers are started once per run under the run's directory, like
bench.peers' (the ClamAV recipe is tests/integration/milterpeers.py's),
and stopped by pid when the run ends.
"""

import os
import socket
import subprocess
import time

from bench import peers
from bench.harness import Measurement, NotMeasured, Variant
from bench.smtp_bench import count_and_clear, missing_any, recv_line, smtp_source
from tests.integration import realpeers as rp

MILTER_PROGRAMS = ("clamd", "clamav-milter")


def missing_clamav():
    for name in MILTER_PROGRAMS:
        if rp.which(name) is None:
            return "%s missing (apt-get install clamav-daemon clamav-milter)" % name
    return None


def _get(env, name, start):
    """env.get() for the servers of this module (bench.peers stays untouched)."""
    if name in env.started:
        return env.started[name]
    if name in env.failed:
        raise NotMeasured(env.failed[name])
    try:
        value = start(env)
    except NotMeasured as err:
        env.failed[name] = str(err)
        raise
    except Exception as err:
        env.failed[name] = "%s did not start: %s: %s" % (name, type(err).__name__,
                                                         str(err)[:300])
        raise NotMeasured(env.failed[name]) from None
    env.started[name] = value
    return value


def clamav(env):
    def start(env):
        missing = missing_clamav()
        if missing:
            raise NotMeasured(missing)
        from tests.integration import milterpeers
        return env.stack.enter_context(milterpeers.ClamAV())
    return _get(env, "clamav", start)


def smap_milter(env):
    """smap --daemon whose table names the clamav-milter."""
    def start(env):
        spec = clamav(env).spec
        work = env.dir("smap-milter")
        spool = work / "spool"
        spool.mkdir(exist_ok=True)
        table = work / "netperm-table"
        table.write_text("smap: directory %s\nsmap: hostname bench.example\n"
                         "smap: accept-domains example.com\nsmap: maxchildren 1000\n"
                         "smap: milters %s\nsmap: logsocket %s\n"
                         % (spool, spec, env.log_socket()))
        port = rp.free_port()
        proc = rp.Proc([env.launcher("install"), "-c", table, "--daemon",
                        "%s:%d" % (peers.LOOPBACK, port), "-F"], new_session=True,
                       log=work / "daemon.out")
        env.stack.callback(proc.stop)
        rp.wait_for_listen(peers.LOOPBACK, port)
        return {"port": port, "pid": proc.pid, "spool": str(spool)}
    return _get(env, "smap_milter", start)


def postfix_milter(env):
    """Postfix smtpd (discard transport) with smtpd_milters = the clamav-milter."""
    def start(env):
        spec = clamav(env).spec
        settings = {"default_transport": "discard:bench", "relay_transport": "discard:bench",
                    "local_transport": "discard:bench", "smtpd_milters": spec,
                    "milter_protocol": "6", "milter_default_action": "tempfail"}
        peer = env.stack.enter_context(rp.Postfix(env.dir("postfix-milter"), rp.free_port(),
                                                  settings=settings))
        port = rp.free_port()
        subprocess.run([rp.which("postconf"), "-c", str(peer.confdir), "-M",
                        "%s:%d/inet=%s:%d inet n - n - - smtpd" % (
                            peers.LOOPBACK, port, peers.LOOPBACK, port)],
                       check=True, capture_output=True, timeout=30)
        rp._age_config(peer.confdir)
        subprocess.run([rp.which("postfix"), "-c", str(peer.confdir), "reload"],
                       check=True, capture_output=True, timeout=30)
        rp.wait_for_listen(peers.LOOPBACK, port, 20)
        return {"port": port}
    return _get(env, "postfix_milter", start)


def reply_of(sock):
    data = recv_line(sock)
    while data.split(b"\r\n")[-2][3:4] == b"-":
        data += recv_line(sock)
    return data


def end_of_data_ms(port, messages, size):
    """Mean ms from sending the final dot to the reply, over `messages`
    messages on one connection (each answered 250, else an error)."""
    body = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, size // 78)
    total = 0.0
    with socket.create_connection((peers.LOOPBACK, port), timeout=60) as sock:
        # the final dot is a write of its own: without this, Nagle holds it
        # for the delayed ACK of the body (40 ms) and that is all one sees
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reply_of(sock)
        sock.sendall(b"EHLO bench.example\r\n")
        reply_of(sock)
        for _ in range(messages):
            for line in (b"MAIL FROM:<bench@example.org>\r\n",
                         b"RCPT TO:<user@example.com>\r\n", b"DATA\r\n"):
                sock.sendall(line)
                reply = reply_of(sock)
                if reply[:1] not in b"23":
                    raise RuntimeError("%r answered %r" % (line, reply[:100]))
            sock.sendall(body)
            started = time.monotonic()
            sock.sendall(b".\r\n")
            reply = reply_of(sock)
            total += time.monotonic() - started
            if not reply.startswith(b"250"):
                raise RuntimeError("end of data answered %r" % reply[:100])
        sock.sendall(b"QUIT\r\n")
    return total * 1000.0 / messages


def measurements(env, smoke):
    out = []
    messages = 5 if smoke else 300
    need = lambda *names: missing_any("smtp-source", *names) or missing_clamav()
    for sessions in (1, 10):
        def postfix(sessions=sessions):
            return smtp_source(postfix_milter(env)["port"], sessions, messages, 5 * 1024, False)

        def smap(sessions=sessions):
            info = smap_milter(env)
            peers.clear_dir(os.path.join(info["spool"], "queue"))
            rate = smtp_source(info["port"], sessions, messages, 5 * 1024, False)
            count_and_clear(info["spool"], messages)
            return rate
        out.append(Measurement(
            "milter", "intake through clamav-milter, -s %d, 5 KB, new connection per message "
            "(%d msgs)" % (sessions, messages), "msg/s", True,
            [Variant("Postfix smtpd + clamav-milter", postfix, need("postfix")),
             Variant("smap --daemon + clamav-milter", smap, need("smap"))],
            baseline="Postfix smtpd + clamav-milter"))

    count = 5 if smoke else 200

    def latency(port_of, spool_of=None):
        def measure():
            port = port_of()
            value = end_of_data_ms(port, count, 5 * 1024)
            if spool_of:
                spool = spool_of()
                count_and_clear(spool, count)
            return value
        return measure
    smap_plain = lambda: env.get("smap")
    out.append(Measurement(
        "milter", "final dot → reply, 5 KB, one connection (mean of %d)" % count, "ms", False,
        [Variant("smap --daemon", latency(lambda: smap_plain()["port"],
                                          lambda: smap_plain()["spool"]), need("smap")),
         Variant("smap --daemon + clamav-milter",
                 latency(lambda: smap_milter(env)["port"], lambda: smap_milter(env)["spool"]),
                 need("smap")),
         Variant("Postfix smtpd", latency(lambda: env.get("postfix")["port"]), need("postfix")),
         Variant("Postfix smtpd + clamav-milter",
                 latency(lambda: postfix_milter(env)["port"]), need("postfix"))],
        baseline="smap --daemon"))
    return out
