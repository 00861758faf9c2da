"""The netperm-table reader (DESIGN §4), in the FWTK syntax.

    keywords: attribute argument ...

It reads one text file, keeps the lines whose keyword list names the program
or `*`, and converts each known attribute with its declaration in
common.params.  Every problem is reported as `FILE:LINE: message`; errors make
the table unusable, warnings (a path that does not exist here) do not.

The table is policy that root acts on, so it is read only when it and every
directory above it are root's alone (common.fsguard: no link on the way, a
regular file owned by root and writable by no one else); otherwise the one
problem is `FILE: reason`.  A table that names root's user or group
(`userid root`, `groupid 0`, or a user whose group is 0) is an error: it
would make the privilege drop a no-op.  The content is trusted only as far
as these checks go.
"""

import grp
import os
import pwd

from common import fsguard, hostmatch, params

MAX_TABLE_BYTES = 1 << 20
# the programs that drop to `userid`/`groupid`
DROPPING = (params.SMAP, params.SMAPD, params.POP3GW)


class Problem:
    __slots__ = ("path", "line", "message", "warning")

    def __init__(self, path, line, message, warning=False):
        self.path, self.line, self.message, self.warning = path, line, message, warning

    def __str__(self):
        """FILE:LINE: message, or FILE: message for the file as a whole."""
        kind = "warning: " if self.warning else ""
        if not self.line:
            return "%s: %s%s" % (self.path, kind, self.message)
        return "%s:%d: %s%s" % (self.path, self.line, kind, self.message)


def split_words(text):
    """Split on white space; '...' and "..." quote.  Raises ValueError."""
    words, word, quote, have = [], [], None, False
    for char in text:
        if quote:
            if char == quote:
                quote = None
            else:
                word.append(char)
        elif char in "'\"":
            quote, have = char, True
        elif char.isspace():
            if have or word:
                words.append("".join(word))
            word, have = [], False
        else:
            word.append(char)
    if quote:
        raise ValueError("unterminated quote")
    if have or word:
        words.append("".join(word))
    return words


def logical_lines(text):
    """(line number, text) with comments dropped and `\\` continuations joined."""
    pending, start = None, 0
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if pending is None and line.lstrip().startswith("#"):
            continue
        if pending is None:
            start = number
            pending = ""
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        if pending.strip():
            yield start, pending
        pending = None
    if pending is not None and pending.strip():
        yield start, pending


class Config:
    """What one program reads from the table: typed values and host rules."""

    def __init__(self, program, path):
        self.program = program
        self.path = path
        self.values = {}
        self.lines = {}             # attribute -> the line its value came from
        self.rules = []
        self.problems = []
        self.declared = params.for_program(program)

    def get(self, name):
        if name in self.values:
            return self.values[name]
        param = self.declared[name]
        if param.default is None:
            return None
        return convert(param, split_words(str(param.default)))

    def has(self, name):
        return name in self.values

    @property
    def errors(self):
        return [p for p in self.problems if not p.warning]

    def problem(self, line, message, warning=False):
        self.problems.append(Problem(self.path, line, message, warning))


def convert(param, args):
    """The typed value of args for param; raises ValueError with a reason."""
    kind = param.kind
    if kind in ("int",):
        if len(args) != 1:
            raise ValueError("needs exactly one number")
        # int() alone would also take "+5", " 5", "1_000" and non-ASCII digits
        if not (args[0].isascii() and args[0].isdigit()):
            raise ValueError("%r is not a whole number" % args[0])
        value = int(args[0], 10)
        if value < param.low or value > param.high:
            raise ValueError("%d is outside %d..%d" % (value, param.low, param.high))
        return value
    if kind in ("words", "patterns", "command") and not args:
        raise ValueError("needs at least one argument")
    if kind == "words":
        return [w.lower() for w in args]
    if kind == "patterns":
        try:
            return [hostmatch.Pattern(w) for w in args]
        except hostmatch.PatternError as err:
            raise ValueError(str(err)) from None
    if kind == "command":
        if not args[0].startswith("/"):
            raise ValueError("the program must be an absolute path")
        return list(args)
    if len(args) != 1:
        raise ValueError("needs exactly one argument")
    word = args[0]
    if kind == "path":
        if not word.startswith("/"):
            raise ValueError("%r is not an absolute path" % word)
        return os.path.normpath(word)
    if kind == "user":
        user = lookup_user(word)
        if user[0] == 0:
            raise ValueError("refusing %r: uid 0 is root" % word)
        return user
    if kind == "group":
        gid = lookup_group(word)
        if gid == 0:
            raise ValueError("refusing %r: gid 0 is root's group" % word)
        return gid
    if kind == "facility":
        if word.lower() not in params.FACILITIES:
            raise ValueError("unknown syslog facility %r" % word)
        return params.FACILITIES[word.lower()]
    if kind == "bool":
        lowered = word.lower()
        if lowered in ("yes", "on", "true", "1"):
            return True
        if lowered in ("no", "off", "false", "0"):
            return False
        raise ValueError("%r is not yes or no" % word)
    if kind == "choice":
        for choice in param.choices:
            if word.lower() == choice.lower():
                return choice
        raise ValueError("%r is not one of %s" % (word, ", ".join(param.choices)))
    if kind == "hostport":
        if word.lower() == "none":
            return None
        return parse_hostport(word, 0)
    if kind == "name":
        if any(ord(c) < 33 or ord(c) > 126 for c in word):
            raise ValueError("%r has a character that is not allowed" % word)
        return word
    raise ValueError("unknown kind %s" % kind)


def parse_hostport(text, default_port):
    """(host, port) from HOST, HOST:PORT, [V6] or [V6]:PORT."""
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed [ in %r" % text)
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("bad address %r" % text)
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or any(not (c.isalnum() or c in ".-_:") for c in host):
        raise ValueError("bad host name %r" % host)
    problem = hostmatch.literal_problem(host)     # `127.1`, `0x7f.1`, ...
    if problem:
        raise ValueError("%s: %r" % (problem, host))
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError("bad port in %r" % text) from None
    if not 0 <= port <= 65535 or (port == 0 and default_port != 0 and text.endswith(":0")):
        raise ValueError("port out of range in %r" % text)
    return host, port


def lookup_user(word):
    """(uid, gid, name) of a user name or number."""
    try:
        entry = pwd.getpwuid(int(word)) if word.isdigit() else pwd.getpwnam(word)
        return entry.pw_uid, entry.pw_gid, entry.pw_name
    except (KeyError, OverflowError):
        if word.isdigit():
            return int(word), int(word), word
        raise ValueError("no such user %r" % word) from None


def lookup_group(word):
    try:
        return grp.getgrgid(int(word)).gr_gid if word.isdigit() else grp.getgrnam(word).gr_gid
    except (KeyError, OverflowError):
        if word.isdigit():
            return int(word)
        raise ValueError("no such group %r" % word) from None


def parse(text, path, program):
    """A Config of program from the table text (never raises on bad input)."""
    config = Config(program, path)
    for number, line in logical_lines(text):
        if ":" not in line:
            config.problem(number, "no ':' after the program names")
            continue
        keywords, rest = line.split(":", 1)
        names = [k for k in keywords.replace(",", " ").split() if k]
        if not names:
            config.problem(number, "no program named before ':'")
            continue
        unknown = [n for n in names if n != "*" and n not in params.ALL]
        if unknown:
            config.problem(number, "unknown program %s" % ", ".join(unknown))
            continue
        try:
            words = split_words(rest)
        except ValueError as err:
            config.problem(number, str(err))
            continue
        if not words:
            config.problem(number, "no attribute after ':'")
            continue
        attribute, args = words[0], words[1:]
        if program not in names and "*" not in names:
            continue
        param = config.declared.get(attribute)
        if param is None:
            if "*" in names and attribute in params.attribute_names():
                continue  # meant for another program
            config.problem(number, "unknown attribute %r for %s" % (attribute, program))
            continue
        if param.kind == "rules":
            try:
                config.rules.append(hostmatch.parse_rule(attribute, args, number))
            except hostmatch.PatternError as err:
                config.problem(number, "%s: %s" % (attribute, err))
            continue
        try:
            value = convert(param, args)
        except ValueError as err:
            config.problem(number, "%s: %s" % (attribute, err))
            continue
        if attribute in config.values:
            continue  # the first matching line wins
        config.values[attribute] = value
        config.lines[attribute] = number
        if param.kind == "path" and not os.path.exists(value):
            config.problem(number, "%s: %s does not exist on this machine" % (attribute, value),
                           warning=True)
        if param.kind == "command" and not os.path.exists(value[0]):
            config.problem(number, "%s: %s does not exist on this machine" % (attribute, value[0]),
                           warning=True)
    check_identity(config)
    return config


def check_identity(config):
    """The group a dropping program ends up in must not be root's: a userid
    whose own group is 0, with no groupid, would run with gid 0."""
    if config.program not in DROPPING or "groupid" in config.values:
        return
    try:
        _, gid, name = config.get("userid")
    except ValueError:
        return          # the default user does not exist here: reported at start-up
    if gid == 0:
        config.problem(config.lines.get("userid", 0),
                       "userid: %s's group is gid 0 (root's); name another with groupid" % name)


def load(path, program):
    """Read and parse the table; a file that cannot be read, or that is not
    root's alone, is one error (`FILE: reason`)."""
    try:
        fd = fsguard.open_trusted_file(os.path.abspath(path))
    except fsguard.UnsafePath as err:
        config = Config(program, path)
        where = err.reason if err.path == os.path.abspath(path) else str(err)
        if err.missing:
            config.problem(0, "cannot read: %s" % where)
        else:
            config.problem(0, "%s; root acts on this table, so it must be root's alone" % where)
        return config
    except OSError as err:
        config = Config(program, path)
        config.problem(0, "cannot read: %s" % (err.strerror or err))
        return config
    try:
        with open(fd, "rb") as table:
            data = table.read(MAX_TABLE_BYTES + 1)
    except OSError as err:
        config = Config(program, path)
        config.problem(0, "cannot read: %s" % (err.strerror or err))
        return config
    if len(data) > MAX_TABLE_BYTES:
        config = Config(program, path)
        config.problem(0, "larger than %d bytes" % MAX_TABLE_BYTES)
        return config
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        config = Config(program, path)
        config.problem(data[:err.start].count(b"\n") + 1, "not UTF-8 text")
        return config
    return parse(text, path, program)
