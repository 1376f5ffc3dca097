"""A real, authoritative-only DNS server on 127.0.0.1 (UDP and TCP on one port 0) for tests.

Tests that need DNS (DKIM keys, SPF, DMARC, MX) query this server over the loopback
network with ordinary resolvers (dnspython, pyspf, Perl's Net::DNS), never a Python dict
standing in for DNS (STYLE.md rule 9)::

    records = {
        ("s1._domainkey.example.com.", "TXT"): ["v=DKIM1; k=rsa; p=MIIB..."],
        ("example.com.", "MX"): [(10, "mx.example.com.")],
        ("mx.example.com.", "A"): ["192.0.2.25"],
    }
    async with LoopbackDNS(records) as dns:
        get_txt = dkim_dnsfunc(dns.port)
        ok = await asyncio.to_thread(dkim.verify, message, dnsfunc=get_txt)

The server runs in the test's event loop: a *synchronous* resolver (dkimpy's dnsfunc,
pyspf, the doctor) must be called from another thread (`asyncio.to_thread`) or a
subprocess, or it would wait for a loop that it blocks.

Records: keys are (name, type), names case-insensitive and made absolute; types TXT, MX,
A, AAAA, CNAME. Values are lists, one item per record:

* TXT: a str/bytes (split into 255-octet character-strings, RFC 1035 3.3.14) or a tuple
  of str/bytes giving the character-strings explicitly;
* MX: (preference, exchange); A / AAAA: address text; CNAME: target name (one).

A name that appears in no key gets NXDOMAIN; a known name without the asked type gets
NOERROR with an empty answer (RFC 2308 2.2 "NODATA"). A UDP answer longer than the
client's limit (512, or its EDNS payload size) comes back truncated with TC set, so
resolvers retry over TCP as they do on the Internet. The dict may be changed while the
server runs; `queries` records (name, type, "udp"|"tcp") for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Self

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TXT import TXT

Records = dict[tuple[str, str], list[Any]]

_IN = dns.rdataclass.IN


def _absolute(name: str) -> str:
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def _strings(value: Any) -> list[bytes]:
    """A TXT record's character-strings."""
    if isinstance(value, tuple):
        return [v.encode() if isinstance(v, str) else bytes(v) for v in value]
    data = value.encode() if isinstance(value, str) else bytes(value)
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


def _rdata(rdtype: str, value: Any) -> dns.rdata.Rdata:
    if rdtype == "TXT":
        return TXT(_IN, dns.rdatatype.TXT, _strings(value))
    if rdtype == "MX":
        preference, exchange = value
        return MX(_IN, dns.rdatatype.MX, int(preference), dns.name.from_text(exchange))
    if rdtype == "CNAME":
        return CNAME(_IN, dns.rdatatype.CNAME, dns.name.from_text(value))
    return dns.rdata.from_text(_IN, dns.rdatatype.from_text(rdtype), str(value))


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: LoopbackDNS):
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.answer(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class LoopbackDNS:
    """Authoritative answers from `records` on 127.0.0.1:`port` (UDP and TCP)."""

    def __init__(self, records: Records | None = None, *, host: str = "127.0.0.1",
                 ttl: int = 60):
        self.records: Records = records if records is not None else {}
        self.host = host
        self.ttl = ttl
        self.port = 0
        self.queries: list[tuple[str, str, str]] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    # -- lifecycle --

    async def start(self) -> None:
        """Bind UDP on port 0, then TCP on the same port (retrying if it is taken)."""
        loop = asyncio.get_running_loop()
        for _ in range(50):
            transport, _protocol = await loop.create_datagram_endpoint(
                lambda: _UDP(self), local_addr=(self.host, 0))
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                transport.close()
                continue
            self._udp = transport  # type: ignore[assignment]
            self.port = port
            return
        raise OSError("no port free for both UDP and TCP on " + self.host)

    async def stop(self) -> None:
        """Close both listeners and any open TCP client."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._clients):
                task.cancel()
            for task in list(self._clients):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    # -- answering --

    def _lookup(self, name: str, rdtype: str) -> list[Any] | None:
        """Records of (name, type); None if the name is unknown altogether."""
        found = None
        for (n, t), values in self.records.items():
            if _absolute(n) == name:
                if found is None:
                    found = []
                if t.upper() == rdtype:
                    found.extend(values)
        return found

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The wire reply to one query (None for garbage that has no usable header)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype, transport))
        qname = question.name
        for _ in range(8):  # follow in-zone CNAMEs (RFC 1034 4.3.2 step 3a)
            values = self._lookup(qname.to_text().lower(), rdtype)
            if values is None:
                if qname == question.name:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                break
            if values:
                response.answer.append(dns.rrset.from_rdata_list(
                    qname, self.ttl, [_rdata(rdtype, v) for v in values]))
                break
            cname = self._lookup(qname.to_text().lower(), "CNAME")
            if rdtype == "CNAME" or not cname:
                break
            target = _rdata("CNAME", cname[0])
            response.answer.append(dns.rrset.from_rdata_list(qname, self.ttl, [target]))
            qname = target.target  # type: ignore[attr-defined]
        limit = 65535
        if transport == "udp":
            # RFC 1035 4.2.1 / RFC 6891 6.2.3: 512 octets unless the client's EDNS says more.
            limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while True:
                # RFC 1035 4.2.2 / RFC 7766 8: two-octet length, then the message.
                try:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    wire = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                reply = self.answer(wire, "tcp")
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# --- clients of the loopback server --------------------------------------------------------

def resolver(port: int, host: str = "127.0.0.1", lifetime: float = 5.0) -> dns.resolver.Resolver:
    """A dnspython Resolver that asks only the loopback server (no /etc/resolv.conf)."""
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = [host]
    res.port = port
    res.lifetime = lifetime
    res.timeout = lifetime
    return res


def async_resolver(port: int, host: str = "127.0.0.1",
                   lifetime: float = 5.0) -> dns.asyncresolver.Resolver:
    """The asyncio twin of `resolver`, safe to await in the loop that serves DNS."""
    res = dns.asyncresolver.Resolver(configure=False)
    res.nameservers = [host]
    res.port = port
    res.lifetime = lifetime
    res.timeout = lifetime
    return res


def dkim_dnsfunc(port: int, host: str = "127.0.0.1") -> Callable[..., bytes | None]:
    """A dkimpy `dnsfunc(name, timeout=5)` that fetches TXT records from the loopback
    server through dnspython, as dkimpy's own `dkim.dnsplug.get_txt` does (first TXT
    record, character-strings concatenated; None when there is none)."""
    res = resolver(port, host)

    def get_txt(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            answer = res.resolve(text, "TXT", lifetime=timeout, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)  # type: ignore[attr-defined]

    return get_txt


def txt_records(pairs: Iterable[tuple[str, str]]) -> Records:
    """{(name, "TXT"): [value]} for (name, value) pairs; a shorthand for key records."""
    out: Records = {}
    for name, value in pairs:
        out.setdefault((_absolute(name), "TXT"), []).append(value)
    return out
