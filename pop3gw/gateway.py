"""One pop3-gw connection, start to end (inetd mode and each daemon session).

Every session is a pair of processes that serves one client and ends:

* the session child chroots to `directory`, drops to `userid`/`groupid`
  (common.privs, verified) and does everything the client can influence:
  the POP3 dialogue (pop3gw.session), the upstream login (pop3gw.upstream)
  and the relay (pop3gw.relay);
* the root monitor keeps nothing of the client's connection and answers the
  child's requests on a socketpair (pop3gw.authority): `verify USER DIGEST`,
  `route HOST:PORT` and `sign TIMESTAMP ADDRESS PORT`.  The secrets stay in
  the monitor, which also writes bad-login counts and lockouts to the db
  file, so they persist across sessions and processes.  The destination is
  decided here too (`Router`): the monitor resolves it once (the resolver
  needs /etc files the jail does not have), applies the host rules to every
  address and to the names, and gives the child only the addresses that
  passed; it signs only for one of those.  The monitor trusts nothing the
  child says: every request is a bounded line, re-checked, and their
  number is bounded.

The monitor forks the child, which jails itself and waits, before it reads
the auth db (so the child never had a secret in its memory), and only then
hands it the client: a `go` line with the client's descriptor, its peer and
the banner's timestamp; end of file instead means there is no client, and
the child exits.  Under inetd the process that got the connection on fd 0/1
learns the peer and applies the source-host rules first, then makes the
pair (`connection`).  The daemon makes the pair ahead (`standby`, see
pop3gw.main): its monitor waits for the one connection the daemon passes
it, then does exactly what inetd mode does from the host rules on.  The
child trusts its monitor (root) and nothing else.
"""
import os
import socket
import stat
import time
import urllib.parse

from common import apop, conversation, fsguard, hostmatch, lineio, privs, proxyproto, skeleton
from pop3gw import authority, logins, relay, session, upstream

MAX_ADDRESSES = authority.MAX_ADDRESSES


def prepare_directory(path, logger):
    """The chroot: created (root, 0755) if missing; refused unless it and
    every directory above it are root's, reached without a link and not
    writable by others (sshd's ChrootDirectory rule): privs.drop chroots by
    name, and a directory someone else may write on the way would let them
    put their own tree there."""
    if os.geteuid() != 0:
        return True
    try:
        os.close(fsguard.open_or_make_directory(path, 0o755, owners=(0,), writable_last=False))
    except fsguard.UnsafePath as err:
        logger.error("directory", path=path, reason=str(err))
        return False
    return True


class Context:
    """What a connection needs from the daemon: table, db, log, and the
    server TLS (common.tls.ServerTLS, loaded) when tls-cert/tls-key are set."""

    def __init__(self, config, database, logger, server_tls=None):
        self.config, self.database, self.logger = config, database, logger
        self.server_tls = server_tls


def settings_of(config):
    hostname = socket.gethostname() or "localhost"
    server = config.get("server")
    if server is not None and server[1] == 0:
        server = (server[0], session.DEFAULT_PORT)     # `server HOST`: port 110
    return session.Settings(server, config.get("userpass"), config.rules, hostname,
                            tls_configured=bool(config.get("tls-cert") and config.get("tls-key")),
                            require_tls=bool(config.get("require-tls")))


def connection(context, implicit=False):
    """Run one connection on fd 0/1 (inetd mode; `implicit`: --tls, POP3S);
    returns the exit status."""
    started = time.monotonic()
    peer = admit(context)
    if peer is None:
        return 0
    return SessionPair(context).run(peer, started, implicit)


def admit(context, daemon=False):
    """The client's Peer when the source-host rules let it in; else None,
    after answering and closing (the client is on fd 0/1).  In the daemon
    (`daemon`: the standby's root monitor) a connection from proxy-hosts
    gives its client by its PROXY header (behind_proxy); then
    context.logger says proxy=LB on every line of this session."""
    config, logger = context.config, context.logger
    sock = skeleton.peer_of_fd(0)
    peer, proxy = behind_proxy(context, sock) if daemon else (None, None)
    if peer is False:
        sock.close()
        send(b"-ERR [SYS/TEMP] PROXY protocol header expected\r\n")
        linger_close()
        return None
    if proxy is not None:
        context.logger = logger = proxyproto.tagged(logger, proxy)
    if peer is None:
        peer = hostmatch.peer_of_socket(sock) if sock is not None else hostmatch.Peer()
    if sock is not None:
        sock.close()
    skeleton.set_title("pop3-gw: %s" % peer.addr_text)
    logger.info("connect", host=peer.name_text, addr=peer.addr_text)
    if peer.spoofed:
        logger.warning("spoof", addr=peer.addr_text,
                       reason="reverse name does not resolve back to the address")
    if not hostmatch.may_connect(config.rules, peer):
        logger.notice("deny", host=peer.name_text, addr=peer.addr_text,
                      reason="no permit-hosts rule for this host")
        send(b"-ERR [SYS/PERM] access denied for this host\r\n")
        linger_close()
        return None
    return peer


def behind_proxy(context, sock):
    """(Peer, LB) from the PROXY header of a connection from proxy-hosts,
    (None, None) for any other (its own client: a header it sends reaches
    the jailed child as a command and is refused there), (False, LB) for a
    listed host without a good header (logged).  The root monitor reads it:
    the header's bytes are the load balancer's, not the client's (a host
    not in proxy-hosts is never read here), the read is bounded
    (proxyproto.LIMIT octets, HEADER_WAIT seconds) and the parser pure; and
    the address is what the monitor's host rules, penalties and signer
    judge, so it must not come from the jailed child."""
    patterns = context.config.get("proxy-hosts")
    if not patterns or sock is None:
        return None, None
    try:
        return proxyproto.peer_behind(sock, patterns)
    except proxyproto.ProxyError as err:
        context.logger.notice("deny", addr=err.proxy, proxy=err.proxy,
                              reason="bad PROXY header from a proxy-hosts host: %s" % err.reason)
        return False, err.proxy


def standby(context, control):
    """A daemon's session pair made before its connection arrives (root, fd
    0/1 on /dev/null): it serves the one connection the daemon passes on
    `control` and then exits; end of file there means it is not needed."""
    pair = SessionPair(context, close_in_child=control)
    try:
        message, fds, _, _ = socket.recv_fds(control, 16, 1)
    except OSError:
        message, fds = b"", []
    control.close()
    if not fds:
        pair.cancel()
        return 0
    started = time.monotonic()
    for fd in fds[1:]:
        os.close(fd)
    skeleton.take_client(fds[0])
    # From here exactly the inetd path, with the pair already made (and
    # the PROXY header of a load balancer read first).
    peer = admit(context, daemon=True)
    if peer is None:
        pair.cancel()
        return 0
    # b"t": the connection came to the --tls-daemon port (implicit TLS)
    return pair.run(peer, started, implicit=message == b"t")


class SessionPair:
    """One session's two processes, made before the client has spoken: this
    process stays root and becomes the monitor; the child it forks jails
    itself at once and waits for its one client (`run`) or the end (`cancel`)."""

    def __init__(self, context, close_in_child=None):
        self.context = context
        config = context.config
        self.settings = settings_of(config)
        self.pid = None
        if not prepare_directory(config.get("directory"), context.logger):
            return
        # A syslog socket of the pair's own before the child's chroot: the
        # daemon's may be a dead one to a syslogd restarted since.
        context.logger.close()
        context.logger.connect()
        # The server TLS context (its key in memory) goes to the jailed child,
        # which makes the handshake; the monitor drops its copy at once.
        tls_context = context.server_tls.context if context.server_tls else None
        if tls_context is not None:
            from pop3gw import tlsrelay  # noqa: F401  (the child needs it inside the jail)
        monitor_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            monitor_end.close()
            if close_in_child is not None:
                close_in_child.close()      # the daemon's hand-over is for the monitor
            status = 1
            try:
                status = jailed_child(config, context.logger, self.settings, child_end,
                                      tls_context)
            finally:
                os._exit(status)
        child_end.close()
        context.server_tls = tls_context = None     # the monitor parses no TLS: no key here
        self.pid, self.link = pid, monitor_end
        # Read only now, after the fork: the jailed child never had the secrets
        # in its memory.  Each session reads the file and stats it again before
        # every decision: a change needs no signal.
        if context.database.reload():
            context.logger.error("authfile", reason=context.database.error)

    def cancel(self):
        if self.pid is not None:
            self.link.close()
            os.waitpid(self.pid, 0)
            self.pid = None

    def run(self, peer, started, implicit=False):
        """The monitor's part of the session of the client on fd 0/1
        (`implicit`: POP3S, the child makes the handshake first)."""
        context = self.context
        config, logger = context.config, context.logger
        if self.pid is None:
            send(b"-ERR [SYS/TEMP] gateway misconfigured, try again later\r\n")
            return 1
        timestamp = apop.make_timestamp(self.settings.hostname)
        proxy = getattr(logger, "proxy", None) or "-"     # set by admit: a TaggedLog
        go = "go %s %s %s %d %.6f %s %s\n" % (timestamp, peer.addr or "-",
                                              urllib.parse.quote(peer.name or "-", safe=""),
                                              peer.spoofed, started, proxy,
                                              "tls" if implicit else "plain")
        try:
            socket.send_fds(self.link, [go.encode("ascii")], [0])
        except OSError:
            logger.error("session", addr=peer.addr_text, reason="the session child is gone")
            send(b"-ERR [SYS/TEMP] gateway error, try again later\r\n")
            self.cancel()
            return 1
        # The monitor gives up the client's connection: it ends with the child.
        skeleton.release_client()
        skeleton.set_title("pop3-gw: monitor %s" % peer.addr_text)
        keeper = authority.Authority(context.database, timestamp, config.get("maxbad"),
                                     config.get("badsleep"), logger, source=peer.addr)
        router = Router(self.settings.rules, self.settings.server, peer, logger)
        if config.get("metrics-file"):
            keeper.tally = logins.Tally(config.get("metrics-file"), logger)
        authority.serve(self.link, keeper, router, logger)
        self.link.close()
        _, status = os.waitpid(self.pid, 0)
        return 0 if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else 1


def send(data):
    try:
        os.write(1, data)
    except OSError:
        pass


# -- the root monitor ---------------------------------------------------------
class Router:
    """The monitor's decision where a verified user may go (`route`).

    The destination is resolved once, here; each address it has is checked
    with the host rules (source host, the address, the typed name, the
    resolver's canonical name, user: hostmatch.dest_matches), and only the
    addresses that pass are returned: the child connects to nothing else and
    the signer signs for nothing else.  `-` is the configured `server`,
    which every rule may permit; a HOST:PORT the user named with `%` only a
    rule with a `-dest` list.  An address that connect() takes for this
    host (0.0.0.0/8, ::) or an IPv4-compatible ::a.b.c.d is never used."""

    def __init__(self, rules, server, peer, logger, resolver=None):
        self.rules, self.server, self.peer, self.log = rules, server, peer, logger
        self.resolve = resolver or resolve      # tests give a stand-in for the DNS

    def __call__(self, user, word):
        peer = self.peer
        if word == "-":
            if self.server is None:
                return "denied", "no server configured"
            host, port = self.server
            rules = self.rules
        else:
            try:
                host, port = session.parse_server(word)
            except ValueError as err:
                return "denied", "bad server: %s" % err
            # a rule without -dest speaks only for the configured server
            rules = [rule for rule in self.rules if not rule.permit or rule.dests is not None]
        fields = dict(host=peer.name_text, addr=peer.addr_text, user=user,
                      dest=session.server_text_of(host, port))
        problem = hostmatch.literal_problem(host)
        if problem:
            self.log.notice("deny", **fields, reason=problem)
            return "denied", problem
        try:
            addresses, learned = self.resolve(host, port)
        except LookupError as err:
            return "unavailable", "cannot resolve %s: %s" % (host, err)
        name = None if hostmatch.normalize_address(host) else host
        passed, refused, permit_rule, deny_rule, reason = [], [], None, None, None
        for address in addresses:
            problem = unusable(address)
            if problem:
                refused.append(address)
                reason = reason or problem
                continue
            permitted, rule = hostmatch.decide(
                rules, peer, hostmatch.Destination(address, name, learned, word != "-"), user)
            if permitted:
                passed.append(address)
                permit_rule = permit_rule or rule
            else:
                refused.append(address)
                deny_rule = deny_rule or rule
        if not passed:
            self.log.notice("deny", **fields, rule=deny_rule.line if deny_rule else None,
                            addresses=",".join(refused),
                            reason=reason or "no rule permits this user and destination")
            return "denied", "permission denied"
        self.log.info("permit", **fields, rule=permit_rule.line if permit_rule else None,
                      addresses=",".join(passed), refused=",".join(refused) or None,
                      canonical=",".join(learned) or None)
        return "ok", (port, passed)


def resolve(host, port):
    """(addresses, canonical names) of host, each once, the addresses
    normalised (IPv4-mapped to IPv4) and at most MAX_ADDRESSES; LookupError."""
    numeric = hostmatch.normalize_address(host) is not None
    flags = socket.AI_NUMERICHOST if numeric else socket.AI_CANONNAME
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
    except (OSError, UnicodeError) as err:
        raise LookupError(getattr(err, "strerror", None) or str(err)) from None
    addresses, learned = [], []
    for info in infos:
        canonical = info[3].lower().rstrip(".")
        if canonical and canonical != host.rstrip(".") and canonical not in learned:
            learned.append(canonical)
        address = hostmatch.normalize_address(info[4][0])
        if address and address not in addresses:
            addresses.append(address)
    if not addresses:
        raise LookupError("no address")
    return addresses[:MAX_ADDRESSES], learned[:MAX_ADDRESSES]


def unusable(address):
    """Why an address is never a destination, or None."""
    if ":" not in address:
        if address.split(".", 1)[0] == "0":
            return "0.0.0.0/8 is this host to connect()"
        return None
    packed = socket.inet_pton(socket.AF_INET6, address)
    if packed == bytes(16):
        return ":: is this host to connect()"
    if packed[:12] == bytes(12) and packed != bytes(15) + b"\1":
        return "IPv4-compatible IPv6 address"
    return None


# -- the jailed session child -----------------------------------------------------
LINGER_SECONDS = 2
LINGER_BYTES = 1 << 20


def linger_close():
    """Close our sending side, then read and drop what the client still sends
    for a bounded time: closing with unread input makes the kernel send a
    reset, which can destroy our last -ERR before the client reads it."""
    try:
        sock = socket.socket(fileno=os.dup(1))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(LINGER_SECONDS)
        deadline = time.monotonic() + LINGER_SECONDS
        dropped = 0
        while dropped < LINGER_BYTES and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            dropped += len(data)
    except OSError:
        pass
    finally:
        sock.close()


GO_LIMIT = 1024


def jailed_child(config, logger, settings, link_socket, tls_context=None):
    """Jail and drop at once, then wait for the monitor's `go` with the
    client's descriptor (end of file: no client, exit quietly)."""
    uid, gid, _ = privs.user_and_group(config)
    server_tls = upstream.UpstreamTLS.from_config(config)    # the CA file, before the jail
    if not privs.drop(config.get("directory"), uid, gid):
        logger.warning("unprivileged", reason="not started as root: no chroot, no setuid")
    data, fds = b"", []
    while not data.endswith(b"\n") and len(data) < GO_LIMIT:
        try:
            chunk, more, _, _ = socket.recv_fds(link_socket, GO_LIMIT, 1)
        except OSError:
            chunk, more = b"", []
        fds += more
        if not chunk:
            break
        data += chunk
    words = data.decode("ascii", "replace").split()
    if len(fds) != 1 or len(words) != 8 or words[0] != "go" or words[7] not in ("tls", "plain"):
        for fd in fds:
            os.close(fd)
        return 0
    skeleton.take_client(fds[0])
    _, timestamp, addr, name, spoofed, started, proxy, mode = words
    if proxy != "-":
        logger = proxyproto.tagged(logger, proxy)
    name = urllib.parse.unquote(name)
    peer = hostmatch.Peer(None if addr == "-" else addr, None if name == "-" else name,
                          spoofed == "1")
    skeleton.set_title("pop3-gw: %s" % peer.addr_text)
    return jailed_session(config, logger, settings, peer, timestamp, link_socket,
                          float(started), server_tls, tls_context, mode == "tls")


# How the dialogue before login ended, as the disconnect line says it.
DIALOGUE_ENDINGS = {
    conversation.DONE: "client quit",       # logged in: the relay's ending replaces it
    conversation.CLOSED: "closed before login",
    conversation.TIMEOUT: "timeout before login",
    conversation.EOF: "client closed before login",
    conversation.WRITE_FAILED: "client write failed",
    conversation.SWITCH_REFUSED: "input after STLS before the handshake",
    conversation.SWITCH_FAILED: "TLS handshake failed",
}


def jailed_session(config, logger, settings, peer, timestamp, link_socket, started,
                   server_tls=None, tls_context=None, implicit=False):
    """The client's whole session, jailed: it holds no secret of the auth
    db, only the link; with TLS it holds the server's TLS key (tls_context)
    and makes the handshake itself (implicit: before the banner, POP3S)."""
    link = authority.MonitorLink(link_socket)
    channel = lineio.Channel(0, 1)
    timeout = config.get("timeout")
    fields = dict(host=peer.name_text, addr=peer.addr_text)
    transport, switch = channel, None
    if tls_context is not None:
        from common import tls      # imported before the jail (it loaded the key)
        if implicit:
            try:
                transport = tls.ServerTransport(tls.server_handshake(tls_context, 0, timeout))
            except (OSError, ValueError) as err:
                logger.notice("tls-fail", tls_error=tls.describe_error(err), **fields)
                logger.info("disconnect", reason="TLS handshake failed", bytes_in=0,
                            bytes_out=0, duration="%.3f" % (time.monotonic() - started),
                            **fields)
                return 0
        else:
            switch = StlsSwitch(tls_context, timeout, logger, fields)
    elif implicit:
        logger.error("tls", reason="--tls without tls-cert and tls-key", **fields)
        return 0
    pop = session.Session(settings, peer, link, timestamp, logger,
                          stls=switch is not None and stat.S_ISSOCK(os.fstat(0).st_mode),
                          tls=getattr(transport, "fields", None))
    if switch is not None:
        switch.session = pop
    client_bytes = server_bytes = 0
    # Before login `timeout` bounds a whole command line, not each read.
    dialogue = conversation.Conversation(transport, pop, timeout, switch=switch)
    ended = DIALOGUE_ENDINGS[dialogue.run(until=lambda: pop.login is not None)]
    try:
        if pop.login is not None:
            login = pop.login
            fields.update(user=login.user, dest=session.server_text_of(login.host, login.port))
            skeleton.set_title("pop3-gw: %s %s" % (peer.addr_text, login.user))
            try:
                # Only the addresses the monitor's rules passed (Session.authenticate).
                server = upstream.login(login.addresses, login.port, login.user, link.sign,
                                        timeout, server_tls, login.host)
            except upstream.UpstreamError as err:
                logger.notice("upstream-fail", reason=err.reason, tls_error=err.tls_error,
                              **fields)
                dialogue.write(err.reply)
                ended = "upstream failed"
            else:
                fields.update(server.tls_fields)
                logger.info("login", **fields, **(pop.tls or {}))
                dialogue.write(server.reply)
                if dialogue.transport is channel:
                    result = upstream.relay_session(server, 0, 1, timeout, pop.rest)
                else:
                    from pop3gw import tlsrelay
                    result = tlsrelay.relay(dialogue.transport.sock, server.sock, timeout,
                                            pop.rest, server.rest)
                server.sock.close()
                client_bytes, server_bytes, ended = (result.client_bytes,
                                                     result.server_bytes, result.ended)
    except lineio.Closed:
        ended = "client write failed"
    linger_close()
    logger.info("disconnect", reason=ended,
                bytes_in=dialogue.bytes_in + client_bytes,
                bytes_out=dialogue.bytes_out + server_bytes,
                duration="%.3f" % (time.monotonic() - started), **fields, **(pop.tls or {}))
    return 0


class StlsSwitch:
    """The Conversation's switch for STLS: the handshake on fd 0, bounded
    by timeout; a failure is logged with tls_error= and ends the session.
    `session` is set once the Session exists (it learns the log fields)."""

    def __init__(self, context, timeout, logger, fields):
        self.context, self.timeout, self.logger, self.fields = context, timeout, logger, fields
        self.session = None

    def __call__(self, old):
        from common import tls
        try:
            tls_socket = tls.server_handshake(self.context, 0, self.timeout)
        except (OSError, ValueError) as err:
            self.logger.notice("tls-fail", tls_error=tls.describe_error(err), **self.fields)
            raise lineio.Closed() from None
        transport = tls.ServerTransport(tls_socket)
        if self.session is not None:
            self.session.tls = transport.fields
        return transport
