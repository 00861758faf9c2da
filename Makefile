# mailwall: `make run` starts the quick start on loopback, `make test` runs the tests.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV   := .venv
VPY    := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test unit bench fuzz soak install clean

$(VENV)/.installed: setup.cfg setup.py
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "mailwall needs Python 3.11 or newer ($(PYTHON))"; exit 1; }
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV) || \
	  { echo "cannot create $(VENV): on Debian install python3-venv"; exit 1; }
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

run: $(VENV)/.installed
	$(VPY) demo/run.py

test: $(VENV)/.installed
	$(VPY) -m pytest -q $(PYTEST_ARGS)

unit: $(VENV)/.installed
	$(VPY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) demo/run build *.egg-info .pytest_cache .hypothesis

# Benchmarks against the real peers (issue 6; needs root and the Debian peers, installs nothing)
bench: $(VENV)/.installed
	$(VPY) bench/run.py $(BENCH_ARGS)

# --- make install [PREFIX=/usr/local] [DESTDIR=] ---------------------------
# Programs: the packages are copied to $(LIBDIR) and compiled; $(SBINDIR)
# gets one small wrapper per program that runs the system interpreter in
# isolated mode without `site` (-IS: no PYTHONPATH, no user site, no script
# directory, no site-packages scan; `site` alone costs smap under inetd
# about 0.4x of a bare interpreter start, see docs/PERFORMANCE.md) with an
# explicit sys.path: $(LIBDIR) first, then the standard library, then
# Debian's dist-packages ($(PYTHON_DISTPACKAGES)), where python-daemon and
# setproctitle live (python3-daemon python3-setproctitle).  No virtualenv:
# the daemons start as root and must not depend on a build tree.
# Configuration and the spool are never overwritten; the spool belongs to
# uucp, mode 0700.  A spool that exists already may have been changed by
# uucp, so it is made and chowned by common.spool.install_spool (the code
# smap and smapd use): on descriptors, no link followed, and a link or an
# entry of the wrong type or owner stops the install with `PATH: reason`.
PREFIX     ?= /usr/local
DESTDIR    ?=
SBINDIR    ?= $(PREFIX)/sbin
LIBDIR     ?= $(PREFIX)/lib/mailwall
MANDIR     ?= $(PREFIX)/share/man
DOCDIR     ?= $(PREFIX)/share/doc/mailwall
SYSCONFDIR ?= /etc
SPOOLDIR   ?= /var/spool/smap
EMPTYDIR   ?= /var/empty
SPOOLUSER  ?= uucp
INSTALL_PYTHON ?= /usr/bin/python3
PYTHON_DISTPACKAGES ?= /usr/lib/python3/dist-packages
PROGRAMS   := smap:smap.main smapd:smapd.main pop3-gw:pop3gw.main authmgr:pop3gw.authmgr

install:
	install -d -m 0755 $(DESTDIR)$(SBINDIR) $(DESTDIR)$(LIBDIR) \
	  $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(DOCDIR)/examples/systemd \
	  $(DESTDIR)$(SYSCONFDIR)/mailwall $(DESTDIR)$(SYSCONFDIR)/rsyslog.d
	for pkg in common smap smapd pop3gw; do \
	  install -d -m 0755 $(DESTDIR)$(LIBDIR)/$$pkg && \
	  install -m 0644 $$pkg/*.py $(DESTDIR)$(LIBDIR)/$$pkg/ || exit 1; \
	done
	$(INSTALL_PYTHON) -m compileall -q -d $(LIBDIR) $(DESTDIR)$(LIBDIR)
	for entry in $(PROGRAMS); do \
	  name=$${entry%%:*}; module=$${entry#*:}; \
	  printf '#!%s -IS\n# %s: installed by mailwall'"'"'s make install\nimport sys\nsys.path.insert(0, "%s")\nsys.path.append("%s")\nfrom %s import main\nsys.exit(main())\n' \
	    '$(INSTALL_PYTHON)' "$$name" '$(LIBDIR)' '$(PYTHON_DISTPACKAGES)' "$$module" > $(DESTDIR)$(SBINDIR)/$$name && \
	  chmod 0755 $(DESTDIR)$(SBINDIR)/$$name || exit 1; \
	done
	install -m 0644 man/smap.8 man/smapd.8 man/pop3-gw.8 man/authmgr.8 $(DESTDIR)$(MANDIR)/man8/
	install -m 0644 man/netperm-table.5 $(DESTDIR)$(MANDIR)/man5/
	test -e $(DESTDIR)$(SYSCONFDIR)/mailwall/netperm-table || \
	  install -m 0644 conf/netperm-table $(DESTDIR)$(SYSCONFDIR)/mailwall/netperm-table
	test -e $(DESTDIR)$(SYSCONFDIR)/rsyslog.d/mailwall.conf || \
	  sed 's|/var/spool/smap|$(SPOOLDIR)|g' conf/rsyslog.d/mailwall.conf \
	    > $(DESTDIR)$(SYSCONFDIR)/rsyslog.d/mailwall.conf
	install -m 0644 conf/netperm-table README.md $(DESTDIR)$(DOCDIR)/examples/
	for unit in conf/systemd/*; do \
	  sed -e 's|/usr/local/sbin|$(SBINDIR)|g' -e 's|/etc/mailwall|$(SYSCONFDIR)/mailwall|g' \
	      -e 's|/var/spool/smap|$(SPOOLDIR)|g' $$unit > $(DESTDIR)$(DOCDIR)/examples/systemd/$${unit##*/} || exit 1; \
	done
	$(INSTALL_PYTHON) -IS -c 'import sys; sys.path.insert(0, sys.argv[1]); from common import spool; sys.exit(spool.install_spool(sys.argv[2], sys.argv[3]))' \
	  $(DESTDIR)$(LIBDIR) $(DESTDIR)$(SPOOLDIR) $(SPOOLUSER)
	install -d -m 0755 $(DESTDIR)$(EMPTYDIR)
	@$(INSTALL_PYTHON) -IS -c 'import sys; sys.path.append("$(PYTHON_DISTPACKAGES)"); import daemon, setproctitle' 2>/dev/null || \
	  echo "make install: also install python3-daemon and python3-setproctitle (apt-get install python3-daemon python3-setproctitle)"

# -- issue 7: long fuzzing and fault injection (not part of `make test`) ----
FUZZ_EXAMPLES ?= 120000
TRIALS ?= 20
SEED ?= 1

# hypothesis with the long profile: FUZZ_EXAMPLES inputs for each of the
# eleven properties of tests/security/test_fuzz.py (default: ~1.3 million)
fuzz: $(VENV)/.installed
	HYPOTHESIS_PROFILE=long FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VPY) -m pytest -q \
	  tests/security/test_fuzz.py --hypothesis-show-statistics

# fault injection: TRIALS trials, each killing or breaking one thing; repeatable from SEED
soak: $(VENV)/.installed
	$(VPY) tests/soak/soak.py --trials $(TRIALS) --seed $(SEED)
