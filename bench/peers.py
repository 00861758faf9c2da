"""The servers a benchmark run needs, started once, privately, on loopback.

Every server is started on first use under the run's temporary directory,
on a 127.0.0.1 high port chosen by the kernel, with a private
configuration, and stopped by its pid (or its own process group) when the
run ends: mailwall's smap (--daemon and under xinetd), smapd, pop3-gw,
Postfix (smtpd with the discard transport, and its sendmail), Dovecot,
perdition and nginx's mail proxy.  A server that cannot start makes the
measurements that need it "not measured: <reason>" (NotMeasured), never a
number.  The Debian programs come from tests/integration/realpeers.py.

It trusts the Debian binaries and the mailwall console scripts in .venv,
and that it runs as root (Postfix, Dovecot, chroot/setuid of smap).
"""

import contextlib
import os
import pwd
import subprocess
from pathlib import Path

from bench.harness import NotMeasured
from tests.integration import realpeers as rp

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
LOOPBACK = "127.0.0.1"
NGINX_MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"

# What each server needs installed; `needs()` names what is missing.
REQUIREMENTS = {
    "smtp-source": ["smtp-source"],
    "postfix": ["postfix", "postconf", "sendmail", "postqueue", "smtp-sink"],
    "xinetd": ["xinetd"],
    "dovecot": ["dovecot"],
    "perdition": ["perdition.pop3"],
    "nginx": ["nginx", NGINX_MAIL_MODULE],
    "smap": [str(VENV_BIN / "smap")],
    "smapd": [str(VENV_BIN / "smapd")],
    "pop3-gw": [str(VENV_BIN / "pop3-gw"), str(VENV_BIN / "authmgr")],
}
PACKAGES = {"smtp-source": "postfix", "postfix": "postfix", "xinetd": "xinetd",
            "dovecot": "dovecot-pop3d", "perdition": "perdition",
            "nginx": "nginx-light libnginx-mod-mail"}


def program_missing(name):
    """None when everything `name` needs exists, else 'X missing'."""
    for need in REQUIREMENTS[name]:
        if need.startswith("/"):
            if not os.path.exists(need):
                return "%s missing" % need
        elif rp.which(need) is None:
            return "%s missing" % need
    if name in ("smapd", "pop3-gw"):
        # the console script exists from the start; the package may not yet
        module = {"smapd": "smapd/main.py", "pop3-gw": "pop3gw/main.py"}[name]
        if not (ROOT / module).exists():
            return "%s missing (%s not in the tree)" % (name, module)
    return None


def versions():
    """Installed versions of the peers (dpkg), for the report."""
    out = {}
    for package in ("postfix", "dovecot-core", "perdition", "nginx-light", "nginx-core",
                    "libnginx-mod-mail", "xinetd", "rsyslog"):
        try:
            r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                               capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and r.stdout.strip():
            out[package] = r.stdout.strip()
    return out


class Env:
    """Lazily started servers; `get(name)` starts one or raises NotMeasured."""

    def __init__(self, root, smoke=False):
        self.root = Path(root)
        self.smoke = smoke
        self.stack = contextlib.ExitStack()
        self.started = {}
        self.failed = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stack.close()

    def get(self, name):
        if name in self.started:
            return self.started[name]
        if name in self.failed:
            raise NotMeasured(self.failed[name])
        missing = program_missing(name.split(":")[0]) if name.split(":")[0] in REQUIREMENTS \
            else None
        if missing:
            self.failed[name] = missing
            raise NotMeasured(missing)
        try:
            value = getattr(self, "_start_" + name.replace("-", "_").replace(":", "_"))()
        except NotMeasured as err:
            self.failed[name] = str(err)
            raise
        except Exception as err:
            self.failed[name] = "%s did not start: %s: %s" % (name, type(err).__name__,
                                                             str(err)[:300])
            raise NotMeasured(self.failed[name]) from None
        self.started[name] = value
        return value

    def dir(self, name):
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        rp.open_up(path)
        return path

    # ---- logging: a private rsyslogd, as a real installation would have
    def _start_syslog(self):
        if rp.which("rsyslogd") is None:
            return None             # programs then log nowhere (silently)
        return self.stack.enter_context(rp.Rsyslog(self.dir("rsyslog")))

    def log_socket(self):
        try:
            syslog = self.get("syslog")
        except NotMeasured:
            syslog = None
        return str(syslog.socket) if syslog else str(self.root / "no-syslog")

    # ---- smap
    def _start_smap_table(self):
        work = self.dir("smap")
        spool = work / "spool"
        spool.mkdir(exist_ok=True)
        table = work / "netperm-table"
        table.write_text(
            "smap: directory %s\n"
            "smap: hostname bench.example\n"
            "smap: accept-domains example.com\n"
            "smap: maxchildren 1000\n"
            "smap: logsocket %s\n" % (spool, self.log_socket()))
        return {"table": table, "spool": spool}

    def _start_smap(self):
        info = self.get("smap_table")
        port = rp.free_port()
        # started as `make install` starts it (-IS wrapper), not through the
        # editable install's console script, which imports importlib.metadata
        proc = rp.Proc([self.launcher("install"), "-c", info["table"], "--daemon",
                        "%s:%d" % (LOOPBACK, port), "-F"], new_session=True,
                       log=self.dir("smap") / "daemon.out")
        self.stack.callback(proc.stop)
        rp.wait_for_listen(LOOPBACK, port)
        return {"port": port, "pid": proc.pid, **info}

    def launcher(self, kind, program="smap"):
        """A start-up script for smap (or pop3-gw), like the ones inetd would run:

        install  exactly what `make install` writes to SBINDIR (#!PYTHON -IS,
                 one word: a shebang passes one argument; the library
                 directory first on sys.path, the packages' directory
                 appended), with the venv's interpreter, the checkout as the
                 library directory and the venv's site-packages standing in
                 for Debian's dist-packages (setproctitle);
        site     the wrapper `make install` wrote before (#!PYTHON -I, the
                 library directory first, `site` finds the rest), kept as
                 the comparison for the -IS change;
        venv     .venv/bin/smap, the console script of the editable install.
        """
        if kind == "venv":
            return str(VENV_BIN / program)
        module = {"smap": "smap.main", "pop3-gw": "pop3gw.main"}[program]
        path = self.dir("launchers") / ("%s-%s" % (program, kind))
        python = str(VENV_BIN / "python")
        if kind == "site":
            text = ("#!%s -I\nimport sys\nsys.path.insert(0, %r)\n"
                    "from %s import main\nsys.exit(main())\n" % (python, str(ROOT), module))
        else:
            site = "%s/lib/python%d.%d/site-packages" % (VENV_BIN.parent, *__import__("sys")
                                                         .version_info[:2])
            text = ("#!%s -IS\nimport sys\nsys.path.insert(0, %r)\nsys.path.append(%r)\n"
                    "from %s import main\nsys.exit(main())\n"
                    % (python, str(ROOT), site, module))
        path.write_text(text)
        os.chmod(path, 0o755)
        return str(path)

    LAUNCHERS = ("install", "site", "venv")

    def _start_xinetd(self):
        """One xinetd: smap through each launcher, and the bare interpreter."""
        info = self.get("smap_table")
        ports = {kind: rp.free_port() for kind in self.LAUNCHERS}
        bare_port = rp.free_port()
        extra = "\tinstances = UNLIMITED\n\tper_source = UNLIMITED\n\tcps = 100000 1\n"
        python = os.path.realpath(VENV_BIN / "python")
        text = "".join(rp.Xinetd.service("mwsmap-" + kind, ports[kind], self.launcher(kind),
                                         "-c %s" % info["table"], extra=extra)
                       for kind in self.LAUNCHERS)
        text += rp.Xinetd.service("mwbare", bare_port, python, "-I -S -c pass", extra=extra)
        peer = self.stack.enter_context(rp.Xinetd(self.dir("xinetd"), text))
        return {"smap_port": ports["install"], "smap_ports": ports, "bare_port": bare_port,
                "pid": peer.proc.pid, "python": python, **info}

    # ---- Postfix: smtpd with the discard transport, and sendmail
    def _start_postfix(self):
        settings = {"default_transport": "discard:bench",
                    "relay_transport": "discard:bench",
                    "local_transport": "discard:bench"}
        peer = self.stack.enter_context(rp.Postfix(self.dir("postfix"), rp.free_port(),
                                                   settings=settings))
        port = rp.free_port()
        pc = rp.which("postconf")
        subprocess.run([pc, "-c", str(peer.confdir), "-M",
                        "%s:%d/inet=%s:%d inet n - n - - smtpd" % (LOOPBACK, port,
                                                                  LOOPBACK, port)],
                       check=True, capture_output=True, timeout=30)
        rp._age_config(peer.confdir)
        subprocess.run([rp.which("postfix"), "-c", str(peer.confdir), "reload"],
                       check=True, capture_output=True, timeout=30)
        rp.wait_for_listen(LOOPBACK, port, 20)
        return {"peer": peer, "port": port, "sendmail": peer.sendmail_argv()}

    # ---- Dovecot and its mailboxes
    USERS = {"alice": "alicesecret", "bob": "bobsecret", "carol": "carolsecret"}

    def _start_dovecot(self):
        peer = self.stack.enter_context(rp.Dovecot(self.dir("dovecot"), users=self.USERS))
        count, size = (5, 50 * 1024) if self.smoke else (200, 50 * 1024)
        big = (256 * 1024) if self.smoke else (20 * 1024 * 1024)
        for n in range(count):
            peer.deliver("alice", make_message(n, size))
        peer.deliver("bob", make_message(0, big))
        return {"peer": peer, "port": peer.port, "bulk_count": count,
                "bulk_size": size, "big_size": big}

    def _start_perdition(self):
        dovecot = self.get("dovecot")
        work = self.dir("perdition")
        conf = work / "perdition.conf"
        conf.write_text("")
        port = rp.free_port()
        proc = rp.Proc([rp.which("perdition.pop3"), "--no_daemon", "-f", conf,
                        "--protocol", "POP3", "--bind_address", LOOPBACK,
                        "--listen_port", str(port), "-M", "",
                        "--outgoing_server", "%s:%d" % (LOOPBACK, dovecot["port"]),
                        "-n", "--pid_file", "", "--username", "nobody",
                        "--group", "nogroup", "--connection_limit", "0", "--quiet"],
                       new_session=True, log=work / "perdition.out")
        self.stack.callback(proc.stop)
        rp.wait_for_listen(LOOPBACK, port)
        return {"port": port, "pid": proc.pid}

    def _start_nginx(self):
        dovecot = self.get("dovecot")
        work = self.dir("nginx")
        for sub in ("logs", "temp"):
            (work / sub).mkdir(exist_ok=True)
        port, auth_port = rp.free_port(), rp.free_port()
        conf = work / "nginx.conf"
        conf.write_text("""\
load_module %(module)s;
daemon off;
worker_processes auto;
error_log %(work)s/logs/error.log;
pid %(work)s/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %(work)s/temp/body;
    proxy_temp_path %(work)s/temp/proxy;
    fastcgi_temp_path %(work)s/temp/fastcgi;
    uwsgi_temp_path %(work)s/temp/uwsgi;
    scgi_temp_path %(work)s/temp/scgi;
    server {
        listen %(host)s:%(auth_port)d;
        location /auth {
            add_header Auth-Status OK;
            add_header Auth-Server %(host)s;
            add_header Auth-Port %(dovecot_port)d;
            return 204;
        }
    }
}
mail {
    server_name bench.example;
    auth_http %(host)s:%(auth_port)d/auth;
    server {
        listen %(host)s:%(port)d;
        protocol pop3;
        pop3_auth plain;
    }
}
""" % {"module": NGINX_MAIL_MODULE, "work": work, "host": LOOPBACK, "port": port,
       "auth_port": auth_port, "dovecot_port": dovecot["port"]})
        proc = rp.Proc([rp.which("nginx"), "-c", conf, "-p", work], new_session=True,
                       log=work / "nginx.out")
        self.stack.callback(proc.stop)
        rp.wait_for_listen(LOOPBACK, port)
        return {"port": port}

    def _start_pop3_gw(self):
        dovecot = self.get("dovecot")
        work = self.dir("pop3gw")
        empty = work / "empty"
        empty.mkdir(exist_ok=True)
        authfile = work / "pop3-auth"
        table = work / "netperm-table"
        port = rp.free_port()
        table.write_text(
            "pop3-gw: server %s:%d\n"
            "pop3-gw: directory %s\n"
            "pop3-gw, authmgr: authfile %s\n"
            "pop3-gw: permit-hosts 127.0.0.1\n"
            "pop3-gw: maxchildren 1000\n"
            "*: logsocket %s\n" % (LOOPBACK, dovecot["port"], empty, authfile,
                                   self.log_socket()))
        authmgr = str(VENV_BIN / "authmgr")
        for user, secret in self.USERS.items():
            for argv, stdin in (([authmgr, "-c", str(table), "adduser", user], None),
                                ([authmgr, "-c", str(table), "password", "--stdin", user],
                                 secret + "\n"),
                                ([authmgr, "-c", str(table), "enable", user], None)):
                r = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                   timeout=30)
                if r.returncode != 0 and argv[3] != "enable":
                    raise NotMeasured("authmgr %s failed: %s" % (argv[3], r.stderr.strip()[:200]))
        proc = rp.Proc([self.launcher("install", "pop3-gw"), "-c", table, "--daemon",
                        "%s:%d" % (LOOPBACK, port), "-F", "--pidfile", work / "pop3-gw.pid"],
                       new_session=True, log=work / "pop3-gw.out")
        self.stack.callback(proc.stop)
        try:
            rp.wait_for_listen(LOOPBACK, port)
        except TimeoutError:
            raise NotMeasured("pop3-gw did not start: %s" % proc.output()[-300:]) from None
        return {"port": port, "pid": proc.pid, "table": table}


def make_message(n, size):
    """A plain RFC 5322 message of about `size` octets (LF line ends)."""
    head = ("From: bench@example.org\nTo: user@example.com\nSubject: bench %d\n"
            "Message-ID: <bench.%d@example.org>\n\n" % (n, n)).encode()
    line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:-_+=\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def children_of(pid):
    """Pids whose parent is pid (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def title_of(pid):
    """The process title (cmdline, NULs as spaces); "" when it is gone."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            return fh.read().replace(b"\0", b" ").strip().decode("utf-8", "replace")
    except OSError:
        return ""


def memory_of(pid):
    """(VmRSS, Private_Clean+Private_Dirty, Pss) in KiB from /proc."""
    rss = private = pss = None
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with contextlib.suppress(OSError):
        with open("/proc/%d/smaps_rollup" % pid) as fh:
            private = 0
            for line in fh:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    private += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    return rss, private, pss


def clear_dir(path):
    """Remove the files in a directory (the smap queue between runs)."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(path):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(os.path.join(path, name))


def uid_gid(user):
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid

