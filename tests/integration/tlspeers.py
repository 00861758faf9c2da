"""TLS peers for integration tests (REAL-PEERS.md "TLS: a private CA and TLS
peers"): a private CA made at test time with openssl, a Postfix smtpd mail
hub with STARTTLS on several ports (each with its own certificate, or none),
and Dovecot POP3 with `ssl = required` on STLS and implicit-TLS ports.

No key is committed: every key is made by `openssl genpkey` into a file
opened with mode 0600 under the test's temporary directory.  Everything
listens on 127.0.0.0/8 high ports and is stopped by its own pid (through
realpeers).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.integration import realpeers

CA_CONFIG = """\
[req]
distinguished_name = dn
[dn]
[v3_root]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_inter]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
crlDistributionPoints = URI:http://ca.example.test/test.crl
subjectAltName = ${ENV::SAN}
"""


def _openssl(*args, env=None, cwd=None):
    realpeers.require("openssl")
    run_env = dict(os.environ, SAN="DNS:unused.example.test")
    run_env.update(env or {})
    result = subprocess.run(["openssl", *args], cwd=cwd, env=run_env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=60)
    if result.returncode != 0:
        raise RuntimeError("openssl %s: %s" % (" ".join(args), result.stderr.decode()))
    return result.stdout


def _new_key(path: Path) -> Path:
    """An RSA key written to a file opened 0600 (never readable by others)."""
    data = _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)
    return path


def _serial():
    return "0x" + os.urandom(8).hex()


class TestCA:
    """A root and an intermediate CA in `directory`; `leaf()` makes server
    certificates signed by the intermediate, with the chain after the leaf."""

    __test__ = False            # not a pytest class

    def __init__(self, directory, name="test"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.name = name
        self.config = self.dir / "ca.cnf"
        self.config.write_text(CA_CONFIG)
        root_key = _new_key(self.dir / f"{name}-root.key")
        self.root = self.dir / f"{name}-root.pem"
        _openssl("req", "-x509", "-new", "-key", root_key, "-out", self.root, "-days", "3650",
                 "-subj", f"/CN={name} root", "-config", self.config,
                 "-extensions", "v3_root", "-set_serial", _serial())
        self.inter_key = _new_key(self.dir / f"{name}-inter.key")
        csr = self.dir / f"{name}-inter.csr"
        _openssl("req", "-new", "-key", self.inter_key, "-out", csr,
                 "-subj", f"/CN={name} intermediate", "-config", self.config)
        self.inter = self.dir / f"{name}-inter.pem"
        _openssl("x509", "-req", "-in", csr, "-CA", self.root, "-CAkey", root_key,
                 "-days", "3650", "-out", self.inter, "-extfile", self.config,
                 "-extensions", "v3_inter", "-set_serial", _serial())
        os.chmod(self.root, 0o644)

    def leaf(self, label, sans=("DNS:localhost", "DNS:mx.example.test",
                                "IP:127.0.0.1", "IP:127.0.0.2"), cn="mx.example.test"):
        """(chain path, key path) of a new leaf; the key is 0600."""
        key = _new_key(self.dir / f"{label}.key")
        csr = self.dir / f"{label}.csr"
        _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={cn}",
                 "-config", self.config)
        pem = self.dir / f"{label}.pem"
        _openssl("x509", "-req", "-in", csr, "-CA", self.inter, "-CAkey", self.inter_key,
                 "-days", "365", "-out", pem, "-extfile", self.config,
                 "-extensions", "v3_leaf", "-set_serial", _serial(),
                 env={"SAN": ",".join(sans)})
        chain = self.dir / f"{label}-chain.pem"
        chain.write_bytes(pem.read_bytes() + self.inter.read_bytes())
        os.chmod(chain, 0o644)
        return chain, key


class PostfixHub(realpeers._Stoppable):
    """A private Postfix whose smtpd listens on 127.0.0.1 on one port per
    entry of `ports` ({label: (chain, key) or None}); None is an smtpd
    without TLS.  It relays what it accepts to an smtp-sink (`.sink`);
    `smtpd_tls_security_level = may` with the REAL-PEERS settings."""

    def __init__(self, tmpdir, ports):
        tmpdir = Path(tmpdir)
        self.sink = realpeers.SmtpSink(tmpdir / "sink")
        first = next((pair for pair in ports.values() if pair), None)
        settings = {
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "smtpd_tls_protocols": ">=TLSv1.2",
            "smtpd_tls_mandatory_protocols": ">=TLSv1.2",
            "smtpd_helo_required": "yes",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": "example.org example.test",
        }
        if first:
            settings.update({"smtpd_tls_security_level": "may",
                             "smtpd_tls_cert_file": str(first[0]),
                             "smtpd_tls_key_file": str(first[1])})
        try:
            self.postfix = realpeers.Postfix(tmpdir / "postfix", self.sink.port,
                                             settings=settings)
        except Exception:
            self.sink.stop()
            raise
        self.ports = {}
        try:
            for label, pair in ports.items():
                port = realpeers.free_port()
                service = f"127.0.0.1:{port}/inet=127.0.0.1:{port} inet n - n - - smtpd"
                if pair is None:
                    service += " -o smtpd_tls_security_level=none"
                else:
                    service += (f" -o smtpd_tls_security_level=may"
                                f" -o smtpd_tls_cert_file={pair[0]}"
                                f" -o smtpd_tls_key_file={pair[1]}")
                realpeers._run(["postconf", "-c", self.postfix.confdir, "-Me", service])
                self.ports[label] = port
            realpeers._age_config(self.postfix.confdir)
            realpeers._run(["postfix", "-c", self.postfix.confdir, "reload"])
            for port in self.ports.values():
                realpeers.wait_for_listen(realpeers.LOOPBACK, port, 20)
        except Exception:
            self.stop()
            raise

    def maillog(self):
        return self.postfix.maillog()

    def stop(self):
        self.postfix.stop()
        self.sink.stop()


DOVECOT_TLS = """\
ssl = required
ssl_cert = <{chain}
ssl_key = <{key}
ssl_dh = </usr/share/dovecot/dh.pem
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
verbose_ssl = yes
auth_verbose = yes
"""


def _dovecot_tls_config(text, chain, key, tls_port):
    text = text.replace("ssl = no\ndisable_plaintext_auth = no\n",
                        DOVECOT_TLS.format(chain=chain, key=key))
    return text.replace("  inet_listener pop3s {\n    port = 0\n  }",
                        "  inet_listener pop3s {\n    address = 127.0.0.2\n"
                        f"    port = {tls_port}\n    ssl = yes\n  }}")


def start_dovecot_tls(tmpdir, chain, key, users=None, timeout=15):
    """A Dovecot with TLS required on 127.0.0.2: (dovecot, tls_port);
    dovecot.port is the plain port (STLS).  realpeers.Dovecot is started
    as it is, then restarted with the TLS lines of REAL-PEERS in its file."""
    realpeers.require("dovecot")
    realpeers.require_root()
    tls_port = realpeers.free_port("127.0.0.2")
    dovecot = realpeers.Dovecot(tmpdir, users=users, listen="127.0.0.2", timeout=timeout)
    try:
        dovecot.proc.stop()
        dovecot.conf.write_text(_dovecot_tls_config(dovecot.conf.read_text(), chain, key,
                                                    tls_port))
        dovecot.proc = realpeers.Proc([realpeers._bin("dovecot"), "-F", "-c", dovecot.conf],
                                      new_session=True, log=dovecot.root / "dovecot-tls.out")
        realpeers.wait_for_listen("127.0.0.2", dovecot.port, timeout)
        realpeers.wait_for_listen("127.0.0.2", tls_port, timeout)
    except Exception:
        dovecot.stop()
        raise
    return dovecot, tls_port
