"""common.proxyproto: what a hostile or broken load balancer (or a client
that pretends to be one) can send, fed to the pure parser and to the
reader over a socketpair.  The header is HAProxy's PROXY protocol v1/v2."""

import socket
import struct
import threading

import pytest
from hypothesis import given, settings, strategies as st

from common import hostmatch, proxyproto
from common.proxyproto import ProxyError, parse

SIG = proxyproto.SIGNATURE


def v2(command=0x21, family=0x11, payload=b"", length=None):
    return SIG + bytes([command, family]) + struct.pack(
        "!H", len(payload) if length is None else length) + payload


def v2_tcp4(client="192.0.2.7", server="198.51.100.1", sport=40000, dport=25, tlvs=b""):
    return v2(payload=socket.inet_aton(client) + socket.inet_aton(server)
              + struct.pack("!HH", sport, dport) + tlvs)


def v2_tcp6(client="2001:db8::7", server="2001:db8::1", sport=40000, dport=25, tlvs=b""):
    return v2(family=0x21, payload=socket.inet_pton(socket.AF_INET6, client)
              + socket.inet_pton(socket.AF_INET6, server) + struct.pack("!HH", sport, dport)
              + tlvs)


# -- good headers ---------------------------------------------------------------
def test_v1_tcp4_as_haproxy_sends_it():
    header = parse(b"PROXY TCP4 127.0.0.4 127.0.0.1 47275 40001\r\nEHLO x\r\n")
    assert (header.version, header.client, header.client_port, header.server,
            header.server_port) == (1, "127.0.0.4", 47275, "127.0.0.1", 40001)
    assert header.length == len(b"PROXY TCP4 127.0.0.4 127.0.0.1 47275 40001\r\n")


def test_v1_tcp6_ipv6_and_mapped_ipv4_is_judged_as_ipv4():
    assert parse(b"PROXY TCP6 ::1 ::1 38391 40002\r\n").client == "::1"
    header = parse(b"PROXY TCP6 ::ffff:192.0.2.9 ::1 1 2\r\n")
    assert header.client == "192.0.2.9"


def test_v1_unknown_uses_the_connection_own_address():
    line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    header = parse(line + b"EHLO")
    assert header.local and header.length == len(line)
    assert parse(b"PROXY UNKNOWN\r\n").local


def test_v2_tcp4_tcp6_local_unspec():
    header = parse(v2_tcp4() + b"rest")
    assert (header.version, header.client, header.client_port, header.length) == \
        (2, "192.0.2.7", 40000, 28)
    assert parse(v2_tcp6()).client == "2001:db8::7"
    assert parse(v2_tcp6(client="::ffff:192.0.2.1")).client == "192.0.2.1"
    assert parse(v2(command=0x20, family=0x11, payload=b"x" * 12)).local   # LOCAL
    assert parse(v2(command=0x21, family=0x00)).local                       # UNSPEC


def test_v2_tlvs_are_skipped():
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00"
    header = parse(v2_tcp4(tlvs=tlvs) + b"EHLO")
    assert header.client == "192.0.2.7" and header.length == 28 + len(tlvs)


# -- refused headers ---------------------------------------------------------------
@pytest.mark.parametrize("line", [
    b"PROXY TCP4 127.0.0.04 127.0.0.1 1 2\r\n",        # leading zero
    b"PROXY TCP4 127.1 127.0.0.1 1 2\r\n",              # short form
    b"PROXY TCP4 2130706433 127.0.0.1 1 2\r\n",          # a number
    b"PROXY TCP4 0x7f.0.0.1 127.0.0.1 1 2\r\n",
    b"PROXY TCP4 256.0.0.1 127.0.0.1 1 2\r\n",
    b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n",                 # v6 in TCP4
    b"PROXY TCP6 127.0.0.1 ::1 1 2\r\n",                 # v4 in TCP6
    b"PROXY TCP6 0:0:0:0:0:0:0:1 ::1 1 2\r\n",           # not RFC 5952
    b"PROXY TCP6 ::FFFF:192.0.2.1 ::1 1 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",              # zone index
    b"PROXY TCP4 127.0.0.1 127.0.0.1 65536 2\r\n",       # out of range
    b"PROXY TCP4 127.0.0.1 127.0.0.1 080 2\r\n",         # leading zero
    b"PROXY TCP4 127.0.0.1 127.0.0.1 +80 2\r\n",
    b"PROXY TCP4 127.0.0.1 127.0.0.1 -1 2\r\n",
    b"PROXY TCP4 127.0.0.1 127.0.0.1 1 \xd9\xa1\r\n",  # Arabic-Indic digit
    b"PROXY TCP4  127.0.0.1 127.0.0.1 1 2\r\n",         # two spaces
    b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2 \r\n",         # trailing space
    b"PROXY TCP4 127.0.0.1 127.0.0.1 1\r\n",            # field missing
    b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\n",            # bare LF
    b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\r\r\n",        # bare CR
    b"PROXY UNKNOWN\r\r\n",
    b"PROXY UDP4 127.0.0.1 127.0.0.1 1 2\r\n",
    b"PROXY tcp4 127.0.0.1 127.0.0.1 1 2\r\n",
    b"PROXY\r\n",
    b"PROXY TCP4 127.0.0.1\x00 127.0.0.1 1 2\r\n",
    b"EHLO client.example\r\n",
    b"proxy TCP4 127.0.0.1 127.0.0.1 1 2\r\n",
])
def test_v1_bad_lines_are_refused(line):
    with pytest.raises(ProxyError):
        parse(line)


def test_v1_longer_than_107_octets_is_refused_without_waiting_for_more():
    with pytest.raises(ProxyError, match="107"):
        parse(b"PROXY UNKNOWN " + b"x" * 93)
    assert parse(b"PROXY UNKNOWN " + b"x" * 92) is None       # 106: may still end
    assert parse(b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n").length == 107


@pytest.mark.parametrize("data,reason", [
    (SIG + b"\x11\x11\x00\x0c" + b"\0" * 12, "version"),
    (SIG + b"\x22\x11\x00\x0c" + b"\0" * 12, "command"),
    (v2(family=0x12, payload=b"\0" * 12), "family"),          # UDP
    (v2(family=0x31, payload=b"\0" * 216), "family"),         # UNIX
    (v2(family=0x11, payload=b"\0" * 8), "TCP4 block"),
    (v2(family=0x21, payload=b"\0" * 20), "TCP6 block"),
    (v2(payload=b"", length=proxyproto.V2_PAYLOAD_LIMIT + 1), "length"),
    (v2(payload=b"", length=0xffff), "length"),
    (v2_tcp4(tlvs=b"\x01\x00"), "truncated TLV"),
    (v2_tcp4(tlvs=b"\x01\x00\x05abc"), "TLV longer"),
    (v2_tcp4(tlvs=b"\x04\x00\x00" * (proxyproto.MAX_TLVS + 1)), "TLVs"),
    (b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x00", "signature"),
])
def test_v2_bad_headers_are_refused(data, reason):
    with pytest.raises(ProxyError, match=reason):
        parse(data)


def test_v2_length_longer_than_the_data_waits_for_more():
    header = v2_tcp4()
    assert parse(header[:-1]) is None
    assert parse(v2(payload=b"\0" * 12, length=100)) is None


def test_wrong_signature_is_refused_at_the_first_wrong_octet():
    with pytest.raises(ProxyError):
        parse(b"\r\n\r\nX")
    with pytest.raises(ProxyError):
        parse(b"PROX!")
    with pytest.raises(ProxyError):
        parse(b"HELO")


def test_every_truncation_of_good_headers_needs_more():
    for header in (b"PROXY TCP6 2001:db8::7 ::1 38391 40002\r\n", v2_tcp6(),
                   v2_tcp4(tlvs=b"\x01\x00\x02h2")):
        for cut in range(len(header)):
            assert parse(header[:cut]) is None, (header, cut)


# -- properties ---------------------------------------------------------------------
addresses4 = st.ip_addresses(v=4).map(str)
addresses6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@given(addresses4, addresses4, ports, ports, st.binary(max_size=64))
def test_v1_tcp4_round_trip_and_the_rest_is_untouched(client, server, sport, dport, rest):
    line = ("PROXY TCP4 %s %s %d %d\r\n" % (client, server, sport, dport)).encode()
    header = parse(line + rest)
    assert (header.client, header.client_port, header.server_port) == (client, sport, dport)
    assert (line + rest)[header.length:] == rest


@given(addresses6, addresses6, ports, ports)
def test_v2_tcp6_round_trip_normalises_like_a_peer(client, server, sport, dport):
    header = parse(v2_tcp6(client, server, sport, dport))
    assert header.client == hostmatch.normalize_address(client)
    assert header.client_port == sport


@given(addresses6)
def test_v1_tcp6_accepts_exactly_the_canonical_spelling(client):
    canonical = proxyproto.canonical_ipv6(socket.inet_pton(socket.AF_INET6, client))
    header = parse(("PROXY TCP6 %s ::1 1 2\r\n" % canonical).encode())
    assert header.client == hostmatch.normalize_address(client)
    exploded = ":".join("%x" % word for word in struct.unpack(
        "!8H", socket.inet_pton(socket.AF_INET6, client))).upper()
    if exploded != canonical:
        with pytest.raises(ProxyError):
            parse(("PROXY TCP6 %s ::1 1 2\r\n" % exploded).encode())


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_give_a_header_more_or_a_reason(data):
    try:
        header = parse(data)
    except ProxyError as err:
        assert err.reason
        return
    if header is not None:
        assert 0 < header.length <= len(data)
        assert header.local or hostmatch.normalize_address(header.client) == header.client


@settings(max_examples=200)
@given(st.sampled_from([b"PROXY TCP4 192.0.2.7 192.0.2.1 1 2\r\n", b"PROXY UNKNOWN\r\n"]),
       st.binary(max_size=40), st.integers(0, 39))
def test_mutated_v1_headers_never_crash(line, junk, at):
    data = line[:at] + junk + line[at:]
    try:
        parse(data)
    except ProxyError:
        pass


# -- the reader over a real socket -------------------------------------------------
def reader_result(chunks, wait=2.0):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def send():
        for chunk in chunks:
            theirs.sendall(chunk)
            threading.Event().wait(0.02)
        theirs.shutdown(socket.SHUT_WR)
    sender = threading.Thread(target=send)
    sender.start()
    try:
        try:
            result = proxyproto.read_header(ours, wait)
        except ProxyError as err:
            result = err
        sender.join()
        theirs.close()
        rest = b""
        ours.settimeout(2)
        while True:
            chunk = ours.recv(4096)
            if not chunk:
                break
            rest += chunk
        return result, rest
    finally:
        ours.close()


def test_a_header_split_across_many_reads_leaves_the_client_bytes_unread():
    header = b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 25\r\n"
    chunks = [header[i:i + 3] for i in range(0, len(header), 3)] + [b"EHLO early\r\n"]
    result, rest = reader_result(chunks)
    assert result.client == "192.0.2.7"
    assert rest == b"EHLO early\r\n"


def test_a_v2_header_one_octet_at_a_time_with_client_bytes_in_the_last_read():
    header = v2_tcp6(tlvs=b"\x01\x00\x02h2")
    result, rest = reader_result([bytes([b]) for b in header[:-1]] + [header[-1:] + b"USER x"])
    assert result.client == "2001:db8::7"
    assert rest == b"USER x"


def test_the_header_and_the_client_bytes_in_one_read():
    result, rest = reader_result([v2_tcp4() + b"\r\n\r\nQUIT\r\n"])
    assert result.client == "192.0.2.7" and rest == b"\r\n\r\nQUIT\r\n"


def test_a_truncated_header_then_silence_times_out():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        theirs.sendall(b"PROXY TCP4 192.0.2.7")
        with pytest.raises(ProxyError, match="within"):
            proxyproto.read_header(ours, 0.3)
    finally:
        ours.close()
        theirs.close()


def test_a_truncated_header_then_end_of_file_and_a_bad_one_are_refused():
    result, _ = reader_result([b"PROXY TCP4 192.0.2.7"])
    assert isinstance(result, ProxyError) and "closed inside" in result.reason
    result, rest = reader_result([b"EHLO me\r\n"])
    assert isinstance(result, ProxyError) and rest == b"EHLO me\r\n"


def test_a_header_that_never_ends_stops_at_the_bound():
    result, _ = reader_result([b"PROXY UNKNOWN " + b"y" * 50] * 4)
    assert isinstance(result, ProxyError) and "107" in result.reason


# -- policy ----------------------------------------------------------------------------
def tcp_pair(source="127.0.0.1"):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.socket()
    client.bind((source, 0))
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def patterns(*words):
    return [hostmatch.Pattern(word) for word in words]


def test_an_unlisted_host_is_not_read_and_its_header_stays_client_talk():
    client, server = tcp_pair("127.0.0.3")
    try:
        client.sendall(b"PROXY TCP4 10.0.0.1 127.0.0.1 1 25\r\n")
        peer, proxy = proxyproto.peer_behind(server, patterns("127.0.0.2"), lambda a: (None, False))
        assert (peer, proxy) == (None, None)
        assert proxyproto.looks_like_header(server.recv(100, socket.MSG_PEEK))
    finally:
        client.close()
        server.close()


def test_a_listed_host_gives_the_client_behind_it_with_a_confirmed_name():
    client, server = tcp_pair("127.0.0.2")
    try:
        client.sendall(b"PROXY TCP4 10.0.0.1 127.0.0.1 1 25\r\n")
        peer, proxy = proxyproto.peer_behind(server, patterns("127.0.0.2"),
                                             lambda a: ("host-%s.example" % a, False))
        assert (peer.addr, peer.name, proxy) == ("10.0.0.1", "host-10.0.0.1.example",
                                                  "127.0.0.2")
    finally:
        client.close()
        server.close()


def test_a_listed_host_without_a_header_is_refused_with_its_address():
    client, server = tcp_pair("127.0.0.2")
    try:
        client.sendall(b"EHLO lb\r\n")
        with pytest.raises(ProxyError) as caught:
            proxyproto.peer_behind(server, patterns("127.0.0.0/24"), lambda a: (None, False))
        assert caught.value.proxy == "127.0.0.2"
    finally:
        client.close()
        server.close()


def test_a_local_health_check_is_the_load_balancer_itself():
    client, server = tcp_pair("127.0.0.2")
    try:
        client.sendall(v2(command=0x20, family=0x00))
        peer, proxy = proxyproto.peer_behind(server, patterns("127.0.0.2"), lambda a: (None, False))
        assert peer.addr == proxy == "127.0.0.2"
    finally:
        client.close()
        server.close()


def test_tagged_log_adds_the_proxy_field():
    lines = []

    class Recorder:
        def info(self, event, **fields):
            lines.append((event, fields))
    proxyproto.tagged(Recorder(), "127.0.0.2").info("connect", addr="10.0.0.1")
    assert lines == [("connect", {"addr": "10.0.0.1", "proxy": "127.0.0.2"})]
    assert proxyproto.tagged(lines, None) is lines


# -- the table ------------------------------------------------------------------------
def table(text, program="smap"):
    from common import netperm
    return netperm.parse(text, "table", program)


def test_proxy_hosts_takes_addresses_cidr_and_address_globs():
    for program in ("smap", "pop3-gw"):
        config = table("%s: proxy-hosts 127.0.0.2 10.1.0.0/16 2001:db8::/32 192.0.2.* ::1\n"
                       % program, program)
        assert not config.errors
        found = config.get("proxy-hosts")
        assert hostmatch.list_matches(found, "10.1.2.3", None)
        assert hostmatch.list_matches(found, "2001:db8::9", None)
        assert not hostmatch.list_matches(found, "127.0.0.3", None)


def test_proxy_hosts_refuses_names_and_star():
    assert "name" in str(table("smap: proxy-hosts lb.example.com\n").errors[0])
    assert "any client address" in str(table("smap: proxy-hosts *\n").errors[0])
    assert table("smap: proxy-hosts 127.1\n").errors
    assert table("smapd: proxy-hosts 127.0.0.1\n", "smapd").errors     # not smapd's


def test_no_proxy_hosts_by_default():
    assert table("").get("proxy-hosts") is None
