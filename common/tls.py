"""Everything about TLS settings, once (DESIGN §12.1): the server contexts of
smap and pop3-gw, the client contexts of the inside legs (smapd to the mail
hub, pop3-gw to the inside POP3 server), the `-n` check of the files, the
SIGHUP reload and the log fields.

Importing this module imports `ssl` (some 10 ms): smap's inetd path must
import it only when TLS is configured.

Server contexts.  TLS 1.2 and 1.3 only (`tls-min-version` raises the
floor), forward-secret AEAD suites only for TLS 1.2 (ECDHE or DHE with
AES-GCM or ChaCha20-Poly1305; every TLS 1.3 suite is forward secret), no
compression, no renegotiation, the server's cipher order.  No session
tickets (TLS 1.2 tickets off, no TLS 1.3 tickets): under inetd every
connection is a new process whose ticket key would be new, so a ticket never
resumes anything there, and a --daemon would share one ticket key, never
rotated, among all its forked sessions for its whole life, so that whoever
learns it could decrypt every recorded session it protected.  No CA store
is loaded into a server context: it asks for no client certificate, and
loading the system store would cost every inetd connection milliseconds.

What is trusted.  The certificate and key are files root reads for a
secret, so they are opened with common.fsguard (directories root's alone,
a regular file owned by root, writable by no one else; the key also
readable by no one else).  A symbolic link is followed only where it
cannot have been planted: the link itself owned by root in a directory
that is root's alone (an ACME client's `live/NAME/privkey.pem` links into
`archive/`), at most MAX_LINKS of them, each target checked again.  The
bytes read (at most MAX_PEM) are handed to OpenSSL through an anonymous
memory file, never by the path: the key is read as root before the jail,
and nothing inside a jail can name it.  A CA file for a client context is
checked the same way (root's, writable by no one else: it decides whom
the inside legs trust) and loaded from its bytes; the system store is
loaded from its bundle file at once (not the lazy hashed directory, which
a jailed process could not read later).

Nothing here trusts the peer: handshake errors become one bounded line
for `tls_error=`.
"""

import os
import ssl
import stat

from common import fsguard

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
# TLS 1.2 suites: key exchange forward secret, AEAD only (OpenSSL names).
# TLS 1.3 suites are OpenSSL's defaults, all AEAD with (EC)DHE.
CIPHERS_TLS12 = ("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
                 ":!aNULL:!eNULL:!PSK:!SRP:!DSS:!SHA1")
MAX_PEM = 1 << 20           # a certificate chain or key larger than 1 MB is no PEM we want
MAX_LINKS = 8
MAX_ERROR = 200             # characters of a handshake error kept for the log


class TLSFileError(Exception):
    """A certificate, key or CA file that cannot be used; str() is `FILE: reason`."""

    def __init__(self, path, reason):
        super().__init__("%s: %s" % (path, reason))
        self.path, self.reason = path, reason


# -- reading the files ---------------------------------------------------

def resolve_trusted(path):
    """path with the symbolic links at its end followed, each only when it
    is root's (the trusted owners') in a directory that is root's alone;
    TLSFileError otherwise."""
    seen = 0
    path = os.path.normpath(path)
    while True:
        if not os.path.isabs(path):
            raise TLSFileError(path, "not an absolute path")
        parent, name = os.path.split(path)
        try:
            dir_fd = fsguard.open_directory(parent or "/", writable_last=False)
        except fsguard.UnsafePath as err:
            raise TLSFileError(err.path, err.reason) from None
        try:
            try:
                info = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                raise TLSFileError(path, "does not exist") from None
            except OSError as err:
                raise TLSFileError(path, err.strerror or str(err)) from None
            if not stat.S_ISLNK(info.st_mode):
                return path
            if info.st_uid not in fsguard.trusted_owners():
                raise TLSFileError(path, "is a symbolic link owned by uid %d, not by root"
                                   % info.st_uid)
            seen += 1
            if seen > MAX_LINKS:
                raise TLSFileError(path, "more than %d symbolic links" % MAX_LINKS)
            target = os.readlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        path = os.path.normpath(os.path.join(parent, target))


def read_trusted(path, secret):
    """The bytes of a PEM file root trusts (see the module docstring)."""
    final = resolve_trusted(path)
    try:
        fd = fsguard.open_trusted_file(final, secret=secret)
    except fsguard.UnsafePath as err:
        shown = path if err.path == final else err.path
        if final != path and err.path == final:
            raise TLSFileError(path, "%s (through a link to %s)" % (err.reason, final)) from None
        raise TLSFileError(shown, err.reason) from None
    try:
        data = bytearray()
        while len(data) <= MAX_PEM:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    except OSError as err:
        raise TLSFileError(path, err.strerror or str(err)) from None
    finally:
        os.close(fd)
    if len(data) > MAX_PEM:
        raise TLSFileError(path, "larger than %d bytes" % MAX_PEM)
    if b"-----BEGIN " not in data:
        raise TLSFileError(path, "no PEM data in it")
    return data


class _MemoryFile:
    """An anonymous file holding bytes, named /proc/self/fd/N for OpenSSL's
    path-only loaders; it exists only in this process and is closed after."""

    def __init__(self, data):
        self.fd = os.memfd_create("mailwall-tls", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except BaseException:
            os.close(self.fd)
            raise
        self.path = "/proc/self/fd/%d" % self.fd

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        os.close(self.fd)


def _wipe(data):
    if isinstance(data, bytearray):
        data[:] = bytes(len(data))


# -- contexts ------------------------------------------------------------

def _harden(context, min_version):
    context.minimum_version = VERSIONS[min_version]
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(CIPHERS_TLS12)
    context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
                        | ssl.OP_SINGLE_DH_USE | ssl.OP_SINGLE_ECDH_USE)


def server_context(cert_path, key_path, min_version="TLSv1.2"):
    """A server SSLContext from the PEM files; TLSFileError (`FILE: reason`)."""
    if min_version not in VERSIONS:
        raise TLSFileError(cert_path, "unknown TLS version %r" % min_version)
    cert = read_trusted(cert_path, secret=False)
    key = read_trusted(key_path, secret=True)
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _harden(context, min_version)
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET
        context.num_tickets = 0
        with _MemoryFile(cert) as cert_file, _MemoryFile(key) as key_file:
            try:
                context.load_cert_chain(cert_file, key_file, password=_no_password)
            except ssl.SSLError as err:
                raise TLSFileError(key_path, _pair_problem(err, cert_path)) from None
            except _PasswordWanted:
                raise TLSFileError(key_path, "the key is encrypted (a passphrase is needed);"
                                   " store it without one, mode 0600") from None
    finally:
        _wipe(key)
    return context


class _PasswordWanted(Exception):
    pass


def _no_password():
    raise _PasswordWanted()


def _pair_problem(err, cert_path):
    reason = (getattr(err, "reason", None) or "").upper()
    if "KEY_VALUES_MISMATCH" in reason:
        return "the key does not match the certificate in %s" % cert_path
    if "NO_START_LINE" in reason or "PEM" in (getattr(err, "library", "") or "").upper():
        return "not a PEM certificate and key pair (%s)" % (err.reason or err)
    return "unusable certificate or key: %s" % (err.reason or err)


def system_bundle():
    """The path of the system's CA bundle, or None."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def client_context(verify=True, cafile=None, min_version="TLSv1.2", check_hostname=True):
    """A client SSLContext for an inside leg: TLS 1.2 at least, the same
    forward-secret suites; with verify, the peer's certificate must chain
    to cafile (root's alone, loaded from its bytes) or the system bundle,
    and (check_hostname) match the name given to wrap_socket.  Without
    verify nothing is checked (encryption against a passive listener
    only).  TLSFileError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context, min_version)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context.check_hostname = bool(check_hostname)
    context.verify_mode = ssl.CERT_REQUIRED
    if cafile:
        data = read_trusted(cafile, secret=False)
        try:
            context.load_verify_locations(cadata=bytes(data).decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as err:
            raise TLSFileError(cafile, "no usable CA certificate: %s"
                               % (getattr(err, "reason", None) or err)) from None
    else:
        bundle = system_bundle()
        if bundle is None:
            raise TLSFileError("system CA store", "no CA bundle on this machine"
                               " (install ca-certificates or name a CA file)")
        try:
            context.load_verify_locations(cafile=bundle)
        except (ssl.SSLError, OSError) as err:
            raise TLSFileError(bundle, "cannot load: %s"
                               % (getattr(err, "reason", None) or err)) from None
    return context


def warm_up():
    """What a client handshake needs that a jailed process could not load
    later: the IDNA codec (wrap_socket encodes server_hostname with it)."""
    "localhost".encode("idna")
    import encodings.idna  # noqa: F401


# -- the server side's files, -n and SIGHUP ---------------------------------

class ServerTLS:
    """A program's server context and how to make it again (SIGHUP).

    `context` is the one in use; `reload(log)` builds a new one from the
    same files and keeps the old one, logging why, when that fails."""

    def __init__(self, cert_path, key_path, min_version="TLSv1.2"):
        self.cert_path, self.key_path, self.min_version = cert_path, key_path, min_version
        self.context = None

    @classmethod
    def from_config(cls, config):
        """ServerTLS of a program's table, or None when tls-cert and tls-key
        are not both set (check_config reports one without the other)."""
        cert, key = config.get("tls-cert"), config.get("tls-key")
        if not cert or not key:
            return None
        return cls(cert, key, config.get("tls-min-version") or "TLSv1.2")

    def load(self):
        """Build the context; TLSFileError."""
        self.context = server_context(self.cert_path, self.key_path, self.min_version)
        return self.context

    def reload(self, log=None):
        """A new context from the files, or the old one kept: True when renewed."""
        try:
            context = server_context(self.cert_path, self.key_path, self.min_version)
        except (TLSFileError, OSError, ssl.SSLError) as err:
            if log is not None:
                log.error("tls-reload", reason=str(err),
                          kept="the certificate loaded before" if self.context else "none")
            return False
        self.context = context
        if log is not None:
            log.info("tls-reload", cert=self.cert_path)
        return True


def check_config(config):
    """The `-n` report of a program's TLS attributes: [`FILE: reason`].
    The files are opened exactly as at start-up (as root, with the same
    checks), so -n says what start-up would say."""
    problems = []
    declared = config.declared
    if "tls-cert" in declared:
        cert, key = config.get("tls-cert"), config.get("tls-key")
        if bool(cert) != bool(key):
            problems.append("%s: tls-cert and tls-key go together; %s is not set"
                            % (config.path, "tls-key" if cert else "tls-cert"))
        elif cert:
            try:
                server_context(cert, key, config.get("tls-min-version") or "TLSv1.2")
            except TLSFileError as err:
                problems.append(str(err))
    for level_name, ca_name, wanted in (("mailhub-tls", "mailhub-ca", ("verify",)),
                                        ("server-tls", "server-ca", ("stls", "implicit"))):
        if level_name not in declared:
            continue
        level = config.get(level_name)
        if level not in wanted:
            continue
        verify = level_name == "mailhub-tls" or config.get("server-tls-verify")
        if not verify:
            continue
        try:
            client_context(True, config.get(ca_name))
        except TLSFileError as err:
            problems.append(str(err))
    return problems


# -- handshakes and log fields -----------------------------------------------

def handshake(sock, context, server_hostname, timeout):
    """The SSLSocket of a client handshake on sock, bounded by timeout
    (ssl.SSLError, OSError or socket.timeout on failure, the connection
    then closed: after a failed handshake it is in no usable state)."""
    sock.settimeout(timeout)
    tls = context.wrap_socket(sock, server_hostname=server_hostname,
                              do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls


def session_fields(tls_socket):
    """{"tls": "TLSv1.3", "cipher": NAME} of an established session."""
    cipher = tls_socket.cipher()
    return {"tls": tls_socket.version() or "unknown",
            "cipher": cipher[0] if cipher else "unknown"}


def describe_error(err):
    """One bounded line for `tls_error=`: what failed, never the peer's bytes raw."""
    if isinstance(err, ssl.SSLCertVerificationError):
        text = "certificate verify failed: %s" % (err.verify_message
                                                  or getattr(err, "reason", None) or "")
    elif isinstance(err, ssl.SSLError):
        text = getattr(err, "reason", None) or err.strerror or str(err)
        if text and text.isupper():
            text = text.lower().replace("_", " ")
    elif isinstance(err, TimeoutError) or type(err).__name__ == "timeout":
        text = "handshake timed out"
    elif isinstance(err, OSError):
        text = err.strerror or str(err) or type(err).__name__
    else:
        text = str(err) or type(err).__name__
    text = "".join(c if c.isprintable() and c.isascii() else "?" for c in str(text))
    return " ".join(text.split())[:MAX_ERROR] or type(err).__name__


# -- the server side's transport (smap STARTTLS, pop3-gw STLS and POP3S) ------

def server_handshake(context, fd, timeout):
    """The SSLSocket of a server handshake with the client on descriptor fd
    (a dup of it: fd itself stays open), bounded by timeout seconds for the
    whole handshake; ssl.SSLError or OSError (TimeoutError) on failure, the
    dup then closed.  The socket is left with no timeout set."""
    import socket
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.settimeout(timeout)
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        # CPython's do_handshake keeps one deadline for its whole call (not
        # one per read), so a client dripping bytes is bounded by timeout too.
        tls.do_handshake()
        tls.settimeout(None)
    except BaseException:
        tls.close()
        raise
    return tls


class ServerTransport:
    """The transport of common.conversation over an established server-side
    SSLSocket: read(timeout), write(data, timeout), readable_now(),
    discard_pending(), fileno(), buffered() (ssl pending(): record bytes
    decrypted but not yet returned), bytes_in / bytes_out (plaintext, what
    the session saw), and `fields` for the log (tls=, cipher=)."""

    READ_SIZE = 65536

    def __init__(self, tls_socket):
        self.sock = tls_socket
        self.bytes_in = 0
        self.bytes_out = 0
        self.fields = session_fields(tls_socket)

    def fileno(self):
        return self.sock.fileno()

    def buffered(self):
        return self.sock.pending()

    def readable_now(self):
        if self.sock.pending():
            return True
        import select
        return bool(select.select([self.sock.fileno()], [], [], 0)[0])

    def read(self, timeout):
        """Up to READ_SIZE bytes; lineio.Timeout, lineio.Closed at end of file
        or on a TLS error (the peer's record is never trusted further)."""
        from common import lineio
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(self.READ_SIZE)
        except (TimeoutError, ssl.SSLWantReadError):
            raise lineio.Timeout() from None
        except ssl.SSLZeroReturnError:
            raise lineio.Closed() from None
        except (ssl.SSLError, OSError):
            raise lineio.Closed() from None
        if not data:
            raise lineio.Closed()
        self.bytes_in += len(data)
        return data

    def write(self, data, timeout=60):
        """All of data, each wait bounded by timeout; lineio.Closed."""
        from common import lineio
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except (ssl.SSLError, OSError):
            raise lineio.Closed() from None
        self.bytes_out += len(data)

    def discard_pending(self, limit=65536):
        """Drop what the client already sent (bounded, never waiting)."""
        dropped = 0
        try:
            self.sock.settimeout(0)
            while dropped < limit:
                data = self.sock.recv(min(self.READ_SIZE, limit - dropped))
                if not data:
                    return
                dropped += len(data)
        except (ssl.SSLError, OSError):
            return

    def close(self):
        """Close the TLS socket (the dup of the client's descriptor)."""
        try:
            self.sock.close()
        except OSError:
            pass
