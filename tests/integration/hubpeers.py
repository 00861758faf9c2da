"""A real Postfix as the inside mail hub that refuses unknown users at RCPT
(REAL-PEERS.md, "Postfix as an inside hub that refuses unknown users"),
for the recipient verification tests (issue 14).

It is realpeers.Postfix (a private instance, nothing on port 25) with one
smtpd on 127.0.0.1:PORT, `mydestination` the test's domain and
`local_recipient_maps = hash:DIR/hub-users`: an unknown user gets `550
5.1.1 <user@domain>: Recipient address rejected: User unknown in local
recipient table`; a known user's mail goes on to an smtp-sink
(`local_transport`).  Stopped by realpeers.Postfix.stop (its master's pid).
Trusts the Debian Postfix binaries, like realpeers.
"""

from pathlib import Path

from tests.integration import realpeers


class InsideHub(realpeers._Stoppable):
    def __init__(self, tmpdir, users, sink_port, domain="example.org", port=None):
        realpeers.require("postfix", "postconf", "postmap")
        realpeers.require_root()
        self.root = realpeers.open_up(realpeers._mkdir(Path(tmpdir)))
        self.port = port or realpeers.free_port()
        self.users = self.root / "hub-users"
        self.users.write_text("".join("%s x\n" % user for user in list(users) + ["postmaster"]))
        realpeers._run([realpeers._bin("postmap"), "hash:%s" % self.users])
        self.postfix = realpeers.Postfix(self.root / "postfix", sink_port, settings={
            "myhostname": "hub.inside.test",
            "mydestination": domain,
            "local_recipient_maps": "hash:%s" % self.users,
            "unknown_local_recipient_reject_code": "550",
            "local_transport": "smtp:[127.0.0.1]:%d" % sink_port,
            "mynetworks": "127.0.0.0/8",
        })
        try:
            postconf = realpeers._bin("postconf")
            realpeers._run([postconf, "-c", self.postfix.confdir, "-M",
                            "127.0.0.1:%d/inet=127.0.0.1:%d inet n - n - - smtpd"
                            % (self.port, self.port)])
            realpeers._age_config(self.postfix.confdir)
            realpeers._run([realpeers._bin("postfix"), "-c", self.postfix.confdir, "reload"])
            realpeers.wait_for_listen("127.0.0.1", self.port, 20)
        except Exception:
            self.postfix.stop()
            raise

    def maillog(self):
        return self.postfix.maillog()

    def probe_sessions(self):
        """The maillog's `disconnect from` lines of sessions that sent RSET
        (the prober's; smapd's deliveries do not)."""
        return [line for line in self.maillog().splitlines()
                if "disconnect from" in line and " rset=" in line]

    def stop(self):
        self.postfix.stop()
