"""smap's command line and its connection path (DESIGN §3, §5).

inetd mode: the client is on fd 0/1.  The path is: read the table, open
the log, silence fd 2, learn the peer, apply the host rules, make sure the
spool is there, chroot to it and drop to userid, then run the SMTP session
until it ends.  Everything needed after the chroot is imported before it.

--daemon [ADDR:]PORT: listen; pre-forked session processes
(common.workers.WorkerPool) each make sure of the spool, start a peer-name
helper (common.lookup: the resolver needs /etc, which the jail lacks),
chroot and drop to userid once, and then run the same path from "learn the
peer" on for up to `maxuse` connections, one at a time, each with a new
session.  `maxuse 1` gives every connection a process of its own.  The
root parent alone holds the listening socket and passes each connection
to an idle session process; a session process holds its client's socket,
its log socket, its helper's socketpair and its socketpair with the
parent, nothing else.
"""

import _socket
import os
import stat
import sys
import time

from common import cli, conversation, fsguard, hostmatch, lineio, log, privs, skeleton, spool
from smap import policy, session

USAGE = """usage: smap [-c TABLE] [-n] [--daemon [ADDR:]PORT [-F]] [--version]
  no mode argument: inetd mode, the client on fd 0/1
  --daemon [ADDR:]PORT  listen; pre-forked processes serve the connections
  -F                    with --daemon: stay in the foreground
  -c, --config TABLE    the netperm-table (default /etc/mailwall/netperm-table)
  -n, --check           check the table, print problems, exit 0 or 1
"""

PROGRAM = "smap"
SERVICE_UNAVAILABLE = b"421 4.3.0 %s Error: service not available, try again later\r\n"
_fqdn = []


def default_hostname():
    if not _fqdn:
        _fqdn.append(getfqdn())
    return _fqdn[0]


def getfqdn():
    """socket.getfqdn() without importing `socket`, and with a bytes host so
    that _socket does not import the idna codec (both cost milliseconds at
    every start under inetd)."""
    name = _socket.gethostname()
    try:
        hostname, aliases, _ = _socket.gethostbyaddr(name.encode("ascii"))
    except (OSError, UnicodeError):
        return name
    for candidate in [hostname] + aliases:
        if "." in candidate:
            return candidate
    return hostname


def connection(config, logger, worker=None):
    """One SMTP connection on fd 0/1, start to end.  inetd mode: worker is
    None, and the process jails itself here; --daemon: a SessionWorker that
    is jailed already and asks its helper for the peer's name."""
    started = time.monotonic()
    channel = lineio.Channel(0, 1)
    sock = skeleton.peer_of_fd(0)
    confirm = worker.lookup.confirmed_name if worker else None
    peer, proxy = behind_proxy(config, sock, confirm, logger) if worker else (None, None)
    if peer is False:
        sock.close()
        channel.discard_pending()
        return 0
    logger = proxyproto_tagged(logger, proxy)
    if peer is None:
        peer = hostmatch.peer_of_socket(sock, confirm) if sock is not None else hostmatch.Peer()
    if sock is not None:
        sock.close()            # a dup of fd 0: closing it leaves fd 0 alone
    skeleton.set_title("smap: %s" % peer.addr_text)
    logger.info("connect", host=peer.name_text, addr=peer.addr_text)
    if peer.spoofed:
        logger.warning("spoof", addr=peer.addr_text,
                       reason="reverse name does not resolve back to the address")
    hostname = config.get("hostname") or default_hostname()
    permitted, _ = hostmatch.decide(config.rules, peer, default=True)
    if not permitted:
        logger.notice("deny", host=peer.name_text, addr=peer.addr_text,
                      reason="no permit-hosts rule for this host")
        channel.write(b"554 5.7.1 %s: access denied\r\n" % hostname.encode())
        channel.discard_pending()
        return 0
    relay_ok = hostmatch.list_matches(config.get("permit-relay") or [], peer.addr, peer.name)
    # STARTTLS only on a socket (not on `swaks --pipe`'s pipes); the context
    # is made before the jail: inetd mode reads the files now, as root.
    tls_context = None
    if sock is not None:
        tls_context = worker.tls_context if worker is not None else load_tls(config, logger)
    require_tls = hostmatch.list_matches(config.get("require-tls") or [], peer.addr, peer.name)
    settings = session.Settings(hostname, config.get("maxbytes"), config.get("maxrecip"),
                                starttls=tls_context is not None, require_tls=require_tls)
    hooks = policy.standard_hooks(config.get("accept-domains") or (), relay_ok)
    if config.get("verify-recipients"):
        from smap import verify     # issue 14: imported only when on, and before the jail
        hooks += verify.hooks_for(config)
    if config.get("milters"):
        from smap import milter     # only then: inetd mode must not import `socket`
        hooks.append(milter.hook(config, logger, worker.lookup if worker else None))
    directory = config.get("directory")
    if worker is not None:
        jailed = worker.jailed
    else:
        try:
            jailed = jail(config)
        except (OSError, privs.PrivilegeError) as err:
            # No jail, no session: the client hears a plain SMTP 421 and retries.
            logger.error("setup", addr=peer.addr_text,
                         reason=getattr(err, "strerror", None) or str(err))
            channel.write(SERVICE_UNAVAILABLE % hostname.encode())
            return 1
        if not jailed:
            logger.warning("unprivileged", reason="not started as root: no chroot, no setuid")
    smtp = session.Session(settings, hooks, peer, "/" if jailed else directory, logger)
    switch = None
    if tls_context is not None:
        switch = starttls_switch(tls_context, smtp, config.get("timeout"), logger)
    dialogue = conversation.Conversation(channel, smtp, config.get("timeout"),
                                         detect_pregreet=True, switch=switch)
    try:
        smtp.explain_pregreet = pregreet_reason
        dialogue.run()
        dialogue.close()
    finally:
        if dialogue.transport is not channel:
            dialogue.transport.close()      # the TLS layer's dup of fd 0
    logger.info("disconnect", host=peer.name_text, addr=peer.addr_text,
                messages=smtp.messages, bytes_in=dialogue.bytes_in,
                bytes_out=dialogue.bytes_out, duration="%.3f" % (time.monotonic() - started),
                **(smtp.tls or {}))
    return 0


def behind_proxy(config, sock, confirm, logger):
    """--daemon only (issue 16): (client Peer, load balancer address) when
    the connection comes from an address in proxy-hosts and its PROXY
    header is good; (None, None) for any other connection (it is its own
    client, and a header it sends is talk before the banner); (False, LB)
    when a listed host sent no good header: refused (421) and logged."""
    patterns = config.get("proxy-hosts")
    if not patterns or sock is None:
        return None, None
    from common import proxyproto   # imported by main() before the workers fork
    try:
        return proxyproto.peer_behind(sock, patterns, confirm)
    except proxyproto.ProxyError as err:
        logger.notice("reject", addr=err.proxy, proxy=err.proxy,
                      reason="bad PROXY header from a proxy-hosts host: %s" % err.reason)
        hostname = config.get("hostname") or default_hostname()
        write_quietly(1, b"421 4.7.0 %s Error: PROXY protocol header expected\r\n"
                      % hostname.encode())
        return False, err.proxy


def proxyproto_tagged(logger, proxy):
    """The log, with proxy=LB on every line when there is a load balancer."""
    if proxy is None:
        return logger
    from common import proxyproto
    return proxyproto.tagged(logger, proxy)


def pregreet_reason():
    """Why the talk before the banner is refused: a PROXY header from a host
    that may not send one (not in proxy-hosts, or inetd mode) is named."""
    sock = skeleton.peer_of_fd(0)
    if sock is None:
        return None
    try:
        import _socket as flags
        early = sock.recv(16, flags.MSG_PEEK | flags.MSG_DONTWAIT)
    except OSError:
        early = b""
    finally:
        sock.close()
    if early.startswith(b"PROXY ") or early.startswith(b"\r\n\r\n\x00\r\nQUIT\n"):
        return "PROXY protocol header from a host not in proxy-hosts (or in inetd mode)"
    return None


def load_tls(config, logger):
    """inetd mode: the server context from tls-cert and tls-key, read now
    (as root, before the jail), or None: not configured, or the files are
    unusable (logged; the session goes on without STARTTLS, as Postfix's
    smtpd does, and `smap -n` names the problem)."""
    if not (config.get("tls-cert") and config.get("tls-key")):
        return None
    from common import tls      # imports ssl: only when TLS is configured
    server = tls.ServerTLS.from_config(config)
    try:
        return server.load()
    except (tls.TLSFileError, OSError) as err:
        logger.error("tls", reason=str(err), tls_error="no STARTTLS offered")
        return None


def starttls_switch(context, smtp, timeout, logger):
    """The Conversation's switch for STARTTLS: the handshake on fd 0, bounded
    by timeout; a failure is logged with tls_error= and ends the session."""
    from common import tls

    def switch(old):
        try:
            tls_socket = tls.server_handshake(context, 0, timeout)
        except (OSError, ValueError) as err:     # ssl.SSLError is an OSError
            logger.notice("tls-fail", addr=smtp.peer.addr_text,
                          tls_error=tls.describe_error(err))
            raise lineio.Closed() from None
        transport = tls.ServerTransport(tls_socket)
        smtp.tls = transport.fields
        return transport
    return switch


_daemon_tls = []


def daemon_tls(config):
    """--daemon: the root parent's ServerTLS (read once; SIGHUP reloads it
    and new workers fork with the new context), or None without TLS.  A
    file that cannot be used stops start-up (cli.StartupError)."""
    if not (config.get("tls-cert") and config.get("tls-key")):
        return None
    if not _daemon_tls:
        from common import tls
        server = tls.ServerTLS.from_config(config)
        try:
            server.load()
        except (tls.TLSFileError, OSError) as err:
            raise cli.StartupError(str(err)) from None
        _daemon_tls.append(server)
    return _daemon_tls[0]


def jail(config, before_chroot=None):
    """Make sure of the spool, then chroot to it and drop to userid (True),
    or nothing when not started as root (False).  before_chroot(uid, gid)
    runs as root just before the chroot.

    The spool is uucp's: root only looks (lstat) whether queue/ is a
    directory; when it is not, spool.make_dirs makes what is missing on
    descriptors without following a link.  Otherwise root checks only that
    the spool and the directories above it are reached without a link and
    that those above are root's, so that chroot() by name lands there.  A
    link or a foreign owner is refused as a PrivilegeError `PATH: reason`
    (the caller logs it and answers 421)."""
    directory = config.get("directory")
    uid, gid, _ = privs.user_and_group(config)
    root = os.geteuid() == 0
    try:
        try:
            queue_made = stat.S_ISDIR(os.lstat(os.path.join(directory, spool.QUEUE)).st_mode)
        except OSError:
            queue_made = False
        if not queue_made:
            spool.make_dirs(directory, uid if root else None, gid)
        elif root:
            os.close(fsguard.open_directory(directory, owners=(0, uid)))
    except fsguard.UnsafePath as err:
        raise privs.PrivilegeError(str(err)) from None
    if before_chroot:
        before_chroot(uid, gid)
    return privs.drop(directory, uid, gid)


class SessionWorker:
    """One pre-forked --daemon process: jailed once, then `connection` per
    client that the parent passes to it on fd 0/1 (the interface of
    common.workers.Worker; not derived from it so that inetd mode need not
    import that module).  The pool has closed the parent's descriptors
    before this runs; this opens only its log socket and its helper."""

    def __init__(self, config, logger, tls_context=None):
        self.config, self.logger = config, logger
        # The parent's server context as it was at this worker's fork (a
        # SIGHUP makes new workers with the new one and retires this one).
        self.tls_context = tls_context
        self.lookup = None
        self.jailed = False
        # A socket of its own, opened before the chroot: the parent's may be
        # a dead one to a syslogd restarted since (the jail cannot reconnect).
        logger.close()
        logger.connect()
        try:
            self.jailed = jail(config, self.start_lookup)
            self.ready = True
        except (OSError, privs.PrivilegeError) as err:
            logger.error("setup", reason=getattr(err, "strerror", None) or str(err))
            self.ready = False
        if self.ready and not self.jailed:
            logger.warning("unprivileged", reason="not started as root: no chroot, no setuid")

    def start_lookup(self, uid, gid):
        from common import lookup   # --daemon only: inetd mode must not pay for its imports
        if self.config.get("milters"):
            from smap import milter     # noqa: F401  (before the chroot: used inside it)
        self.lookup = lookup.Lookup(uid, gid, title="smap: resolver",
                                    milters=self.config.get("milters") or (),
                                    milter_timeout=self.config.get("milter-timeout"))

    @property
    def exhausted(self):
        return self.lookup is not None and self.lookup.broken

    def handle(self):
        return connection(self.config, self.logger, self)

    def refuse(self):
        """The spool or the jail failed: each client hears a 421 and retries."""
        hostname = self.config.get("hostname") or default_hostname()
        write_quietly(1, SERVICE_UNAVAILABLE % hostname.encode())

    def close(self):
        if self.lookup is not None:
            self.lookup.close()


def write_quietly(fd, data):
    try:
        os.write(fd, data)
    except OSError:
        pass


def refuse_inetd(reason):
    """Start-up failed in inetd mode: one log line (default socket), a 421 to
    the client, nothing on fd 2."""
    log.Log(PROGRAM).error("abort", reason=reason)
    write_quietly(1, b"421 4.3.0 Error: service not available, try again later\r\n")
    return 1


@cli.program(PROGRAM, USAGE, refuse=refuse_inetd)
def main(argv=None):
    """cli.program has silenced fd 2 under inetd, and turns a start-up
    error into one line (or, under inetd, refuse_inetd's 421)."""
    argv_given = argv is not None
    argv = sys.argv[1:] if argv is None else argv
    inetd = cli.inetd_mode(argv)
    options = cli.parse(argv, USAGE, with_daemon=True)
    if options.daemon is not None and not options.check:
        host, port = cli.parse_listen(options.daemon, 25)
    config = cli.load_or_die(options, PROGRAM, None if inetd else sys.stderr)
    echo = sys.stderr if options.daemon and options.foreground and sys.stderr.isatty() else None
    logger = log.Log(PROGRAM, config.get("logfacility"), config.get("logsocket"), echo)
    if options.daemon is None:
        try:
            status = connection(config, logger)
        except Exception as err:    # anything unforeseen: log it, the client sees SMTP
            logger.error("abort", reason="%s: %s" % (type(err).__name__, err))
            write_quietly(1, SERVICE_UNAVAILABLE % default_hostname().encode())
            status = 1
        if argv_given:
            return status
        # Run as a program under inetd: every reply went out with os.write
        # and every log line as its own datagram, so nothing is left to
        # flush; skipping the interpreter's tear-down saves about 1.5 ms of
        # every connection.  (Callers that pass argv get a return instead.)
        os._exit(status)
    default_hostname()          # once, not in every child
    if config.get("tls-cert") and config.get("tls-key"):
        daemon_tls(config)      # a bad certificate or key stops start-up here, before listening
    # --daemon only (inetd mode must not pay for them), and before the workers fork
    from common import lookup, proxyproto, workers  # noqa: F401  (lookup, proxyproto: for the workers)
    if config.get("verify-recipients"):
        from smap import verify  # noqa: F401  (issue 14: the workers are jailed before they use it)
    listener = skeleton.listen(host, port, name="--daemon %s" % options.daemon)
    if not options.foreground:
        skeleton.daemonize(keep_fds=[listener.fileno()] + ([logger.sock.fileno()] if logger.sock else []),
                           logger=logger)
    server_tls = daemon_tls(config)
    logger.info("listen", addr=host, port=port, **({"tls": "starttls"} if server_tls else {}))
    server = workers.WorkerPool(
        listener, lambda: SessionWorker(config, logger,
                                        server_tls.context if server_tls else None), logger,
        config.get("maxchildren"), config.get("maxuse"),
        busy_reply=b"421 4.3.2 Too many connections, try again later\r\n",
        title="smap: listening on %s:%d" % (host, port), idle_title="smap: waiting",
        on_reload=(lambda: server_tls.reload(logger)) if server_tls else None)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
