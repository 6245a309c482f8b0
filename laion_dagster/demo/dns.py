"""A loopback DNS server for the tests and the benchmarks: names answered as a recursive
resolver would answer them, some slowly, some not at all.

Each name gets an address (or NXDOMAIN, or silence) and a delay. Like a caching recursive
resolver, the first query for a name waits its delay, queries arriving meanwhile get the same
answer when it comes, and later ones are answered at once; `forget()` empties that cache. AAAA
and other types get an empty NOERROR answer (the name exists, with IPv4 only); names it does
not know get NXDOMAIN. It counts the queries per name, so tests can see what a client asked.
Runs in a thread of its own, like `demo.server.ImageServer`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass

NXDOMAIN = 3


@dataclass(frozen=True)
class Name:
    """How the server answers for one name."""

    address: str | None = None  # None: NXDOMAIN
    delay: float = 0.0  # seconds before the first answer
    silent: bool = False  # never answer (the client's resolver must time out)
    ttl: int = 300


class DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, names: dict[str, Name]):
        self.names = {k.lower().rstrip("."): v for k, v in names.items()}
        self.queries: Counter[str] = Counter()
        self.ready: dict[str, float] = {}  # name -> when the "recursive" answer is ready
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        parsed = parse_query(data)
        if parsed is None:
            return
        qid, flags, name, qtype, question = parsed
        self.queries[name] += 1
        entry = self.names.get(name)
        if entry is not None and entry.silent:
            return
        reply = build_reply(qid, flags, question, qtype, entry)
        loop = asyncio.get_running_loop()
        delay = 0.0 if entry is None else entry.delay
        ready = self.ready.setdefault(name, loop.time() + delay)
        wait = ready - loop.time()
        if wait <= 0:
            self.transport.sendto(reply, addr)
        else:
            loop.call_later(wait, self._send, reply, addr)

    def _send(self, reply: bytes, addr) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


def parse_query(data: bytes) -> tuple[int, int, str, int, bytes] | None:
    """(id, flags, name, qtype, the question section) of a one-question query, else None."""
    try:
        qid, flags, qdcount = struct.unpack("!HHH", data[:6])
        if qdcount != 1 or flags & 0x8000:
            return None
        labels, offset = [], 12
        while data[offset]:
            length = data[offset]
            labels.append(data[offset + 1:offset + 1 + length].decode("ascii").lower())
            offset += 1 + length
        offset += 1
        qtype, _qclass = struct.unpack("!HH", data[offset:offset + 4])
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return qid, flags, ".".join(labels), qtype, data[12:offset + 4]


def build_reply(qid: int, flags: int, question: bytes, qtype: int, entry: Name | None) -> bytes:
    rcode, answer = 0, b""
    if entry is None or entry.address is None:
        rcode = NXDOMAIN
    elif qtype == 1:  # A
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, entry.ttl, 4) + socket.inet_aton(
            entry.address)
    # QR and RA set; opcode and RD copied from the query.
    reply_flags = 0x8080 | (flags & 0x7900) | rcode
    return struct.pack("!HHHHHH", qid, reply_flags, 1, 1 if answer else 0, 0, 0) + question \
        + answer


class DnsServer:
    """`with DnsServer({"a.test": Name("127.0.0.1")}) as dns: dns.address` → "127.0.0.1:port"."""

    def __init__(self, names: dict[str, Name], host: str = "127.0.0.1"):
        self.protocol = DnsProtocol(names)
        self.host = host
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def queries(self) -> Counter[str]:
        return self.protocol.queries

    def forget(self) -> None:
        """Empty the 'recursive' cache: the next query for each name waits its delay again."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.protocol.ready.clear)

    def __enter__(self) -> DnsServer:
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="dns-server", daemon=True)
        self._thread.start()
        self._loop = loop

        async def listen() -> int:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: self.protocol, local_addr=(self.host, 0))
            return transport.get_extra_info("sockname")[1]

        self.port = asyncio.run_coroutine_threadsafe(listen(), loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self.protocol.transport is not None:
            loop.call_soon_threadsafe(self.protocol.transport.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
