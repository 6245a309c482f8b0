"""The simulated internet's servers: one DNS server and the web servers (run by bench/field.py).

    python -m bench.field_serve dns --plan PLAN --listen 198.19.0.1
    python -m bench.field_serve web --plan PLAN --certs DIR [--index N]

Both run inside the web namespace that bench/field_net.py makes, and read the plan that
bench/field_sim.py writes (every name, address and row, with how each behaves), so that a row
behaves the same way for every tool: its behaviour comes from the plan, found by the row number
in the URL's path, never from anything random at serving time.

Why our own servers rather than nginx and a real resolver: the latencies and failures must be
per host and per row (a round trip per request and two more per new connection, a transfer
rate, a name that resolves in 3 s, a row that trickles), this kernel has no netem, and both
stay cheap: bodies from memory, no access log, a Protocol per connection rather than streams.
Each process prints one JSON line a second on stdout (open connections, requests in progress,
the rows it finished with their times), which bench/field.py turns into in-flight series,
progress curves and server CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import socket
import ssl
import sys
import time
from http import HTTPStatus
from pathlib import Path

from laion_dagster.demo.dns import Name, build_reply, parse_query

HOLD_DEFAULT = 60.0  # how long a hanging or trickling row keeps its connection
CHUNK = 16 * 1024
_ROW = re.compile(r"/(\d+)-[^/]*$")
_PAGE = ("<!doctype html><html><head><title>{title}</title></head><body><h1>{title}</h1>"
         "<p>{filler}</p></body></html>")
# JPEG magic, then bytes that are no JPEG marker: passes a magic-number check, fails to parse.
CORRUPT_HEAD = b"\xff\xd8\xff" + bytes(range(7, 256, 3))


def load_plan(path: str) -> dict:
    return json.loads(Path(path).read_text())


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def event_loop_runner():
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


# ---------------------------------------------------------------- DNS

class Dns(asyncio.DatagramProtocol):
    """A records for the plan's names, each answered after its own delay.

    It plays a recursive resolver with a cache: the first query for a name (since the last
    SIGHUP, which bench/field.py sends before every run so no tool profits from the one
    before) waits the name's delay, later ones are answered at once, and queries that arrive
    while the first is pending are answered with it. Names marked "nx" get NXDOMAIN after
    their delay, names marked "drop" get nothing ever (the client's resolver must time out).
    AAAA and other types get an empty NOERROR answer; names outside the plan get NXDOMAIN.
    """

    def __init__(self, plan: dict):
        self.names: dict[str, Name] = {}
        addresses = plan["addresses"]
        for name, (address, kind, delay, _tls) in plan["names"].items():
            self.names[name] = Name(None if kind == "nx" else addresses[address][0],
                                    delay=delay, silent=kind == "drop")
        self.ready: dict[str, float] = {}  # name -> when the resolver's cache has it
        self.lab = False  # SIGUSR1: no delays (the lab), SIGUSR2: the field again
        self.queries = 0
        self.pending = 0  # answers waiting for their delay
        self.peak_pending = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def flush(self) -> None:
        self.ready.clear()

    def datagram_received(self, data: bytes, addr) -> None:
        self.queries += 1
        parsed = parse_query(data)
        if parsed is None:
            return
        qid, flags, name, qtype, question = parsed
        entry = self.names.get(name)  # not in the plan: NXDOMAIN at once
        if entry is not None and entry.silent:
            return
        reply = build_reply(qid, flags, question, qtype, entry)
        delay = entry.delay if entry is not None and not self.lab else 0.0
        loop = asyncio.get_running_loop()
        now = loop.time()
        ready = self.ready.get(name)
        if ready is None:
            ready = self.ready[name] = now + delay
        if ready <= now:
            self.transport.sendto(reply, addr)
        else:
            self.pending += 1
            self.peak_pending = max(self.peak_pending, self.pending)
            loop.call_at(ready, self._send, reply, addr)

    def _send(self, reply: bytes, addr) -> None:
        self.pending -= 1
        self.transport.sendto(reply, addr)


async def serve_dns(args: argparse.Namespace) -> None:
    plan = load_plan(args.plan)
    loop = asyncio.get_running_loop()
    transport, dns = await loop.create_datagram_endpoint(
        lambda: Dns(plan), local_addr=(args.listen, 53))
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    loop.add_signal_handler(signal.SIGHUP, dns.flush)
    loop.add_signal_handler(signal.SIGUSR1, setattr, dns, "lab", True)
    loop.add_signal_handler(signal.SIGUSR2, setattr, dns, "lab", False)
    print(json.dumps({"ready": "dns", "pid": os.getpid()}), flush=True)
    while True:
        await asyncio.sleep(1.0)
        print(json.dumps({"t": round(time.time(), 3), "queries": dns.queries,
                          "pending": dns.peak_pending}), flush=True)
        dns.peak_pending = dns.pending


# ---------------------------------------------------------------- web

class World:
    """What one web server process knows: every address's round trip and rate, every row."""

    def __init__(self, plan: dict, certs: Path):
        self.hold = plan.get("hold", HOLD_DEFAULT)
        self.idle = plan.get("idle", 60.0)
        self.by_address = {a[0]: (a[1], a[2]) for a in plan["addresses"]}
        self.names = list(plan["names"])  # rows refer to names by position
        self.rows = plan["rows"]  # [name index, behaviour, pool index]
        pool_dir = Path(plan["pool_dir"])
        self.pool = [((pool_dir / file).read_bytes(), ctype) for file, ctype in plan["pool"]]
        self.tls_of = {name: entry[3] for name, entry in plan["names"].items() if entry[3]}
        self.ssl = self._contexts(certs)
        # Live counters, reported once a second.
        self.conns = 0
        self.accepted = 0  # connections ever made (each https one a full TLS handshake)
        self.setup = 0  # connections in their handshake round trips
        self.requests_active = 0
        self.requests = 0
        self.done: list = []
        # SIGUSR1: the lab (no round trips, no transfer rates; failures stay as planned),
        # SIGUSR2: the field again.
        self.lab = False

    def _contexts(self, certs: Path) -> ssl.SSLContext:
        def context(cert: str) -> ssl.SSLContext:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certs / f"{cert}.pem", certs / f"{cert}.key")
            ctx.options |= ssl.OP_NO_TICKET  # nobody resumes: spare the server the tickets
            return ctx

        main = context("server")
        others = {"wrongname": context("wrongname"), "untrusted": context("untrusted")}

        def pick(sslobj, server_name, _ctx):
            kind = self.tls_of.get((server_name or "").lower())
            if kind:
                sslobj.context = others[kind]

        main.sni_callback = pick
        return main


class Connection(asyncio.Protocol):
    """One client connection: the handshake delays, then requests one at a time."""

    def __init__(self, world: World, tls: bool):
        self.world = world
        self.tls = tls
        self.transport = None
        self.buffer = bytearray()
        self.wakeup: asyncio.Future | None = None
        self.closed = False
        self.writable: asyncio.Future | None = None
        self.current: int | None = None  # row being answered

    # -- protocol callbacks
    def connection_made(self, transport):
        self.transport = transport
        self.world.conns += 1  # until serve() ends, whatever ends it
        self.world.accepted += 1
        self.task = asyncio.get_running_loop().create_task(self.serve())

    def data_received(self, data):
        self.buffer += data
        self._wake()

    def eof_received(self):
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc):
        self._finish_row("aborted")
        self.closed = True
        self._wake()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self):
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self):
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def _wake(self):
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def _finish_row(self, how: str) -> None:
        if self.current is not None:
            self.world.done += (self.current, round(time.time(), 3), how)
            self.world.requests_active -= 1
            self.current = None

    # -- serving
    async def serve(self) -> None:
        world = self.world
        try:
            sockname = self.transport.get_extra_info("sockname")
            rtt, rate = ((0.0, 1e12) if world.lab
                         else world.by_address.get(sockname[0], (0.08, 2e6)))
            # The TCP handshake's round trip, and TLS 1.3's one more: taken after the
            # handshake (which the loop has done before calling us), before the first request
            # is read. The first byte comes as late as on the real web; only the split between
            # "connected" and "answered" differs.
            world.setup += 1
            try:
                await asyncio.sleep(rtt * (2 if self.tls else 1))
            finally:
                world.setup -= 1
            while not self.closed:
                request = await self._read_request(world.idle)
                if request is None:
                    return
                keep = await self._answer(request, rtt, rate)
                if not keep:
                    return
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            self._finish_row("aborted")
            world.conns -= 1
            if not self.transport.is_closing():
                self.transport.close()

    async def _wait(self, timeout: float | None) -> None:
        self.wakeup = asyncio.get_running_loop().create_future()
        try:
            if timeout is None:
                await self.wakeup
            else:
                await asyncio.wait_for(self.wakeup, timeout)
        except TimeoutError:
            pass
        finally:
            self.wakeup = None

    async def _read_request(self, idle: float):
        deadline = asyncio.get_running_loop().time() + idle
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if self.closed or len(self.buffer) > 65536:
                return None
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            await self._wait(left)
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[:end + 4]
        lines = head.split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            return None
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        keep = version == "HTTP/1.1"
        connection = headers.get("connection", "").lower()
        if "close" in connection:
            keep = False
        elif "keep-alive" in connection:
            keep = True
        return method, target, headers, keep

    def _write(self, data) -> None:
        if not self.closed:
            self.transport.write(data)

    async def _drain(self) -> None:
        if self.writable is not None:
            await self.writable

    async def _answer(self, request, rtt: float, rate: float) -> bool:
        world = self.world
        method, target, headers, keep = request
        world.requests += 1
        match = _ROW.search(target.split("?", 1)[0])
        row = int(match.group(1)) if match else -1
        entry = world.rows[row] if 0 <= row < len(world.rows) else None
        host = headers.get("host", "").split(":", 1)[0].lower()
        self.current = row
        world.requests_active += 1
        await asyncio.sleep(rtt)  # the request's way there and the answer's way back
        if self.closed:
            return False
        if entry is None or world.names[entry[0]] != host or method not in ("GET", "HEAD"):
            return await self._page(404, keep, method)
        _name, behaviour, pool = entry
        if behaviour in ("ok", "noai"):
            body, ctype = world.pool[pool]
            extra = "X-Robots-Tag: noai\r\n" if behaviour == "noai" else ""
            return await self._send(200, ctype, body, keep, rate, extra, method)
        if behaviour.startswith("s"):
            return await self._page(int(behaviour[1:]), keep, method)
        if behaviour == "html":
            title = "Image not available"
            page = _PAGE.format(title=title, filler="lorem ipsum " * (200 + row % 1500))
            return await self._send(200, "text/html; charset=utf-8", page.encode(), keep,
                                    rate, "", method)
        if behaviour == "corrupt":
            size = 2_000 + (row * 7919) % 38_000
            body = (CORRUPT_HEAD * (size // len(CORRUPT_HEAD) + 1))[:size]
            return await self._send(200, "image/jpeg", body, keep, rate, "", method)
        if behaviour == "close":  # the remote closes without a response
            self._finish_row("closed")
            return False
        if behaviour == "hang":  # never answers; gives up after `hold`
            await self._hold(world.hold)
            self._finish_row("closed")
            return False
        if behaviour == "trickle":  # headers, then a byte every 2 s, never the whole body
            body, ctype = world.pool[pool]
            self._write(self._head(200, ctype, len(body), True, ""))
            loop = asyncio.get_running_loop()
            end = loop.time() + world.hold
            sent = 0
            while not self.closed and loop.time() < end:
                self._write(body[sent:sent + 1])
                sent += 1
                await self._hold(2.0)
            self._finish_row("closed")
            return False
        return await self._page(500, keep, method)

    async def _hold(self, seconds: float) -> None:
        end = asyncio.get_running_loop().time() + seconds
        while not self.closed:
            left = end - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await self._wait(left)

    @staticmethod
    def _head(status: int, ctype: str, length: int, keep: bool, extra: str) -> bytes:
        reason = HTTPStatus(status).phrase
        return (f"HTTP/1.1 {status} {reason}\r\nServer: sim\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {length}\r\n{extra}"
                f"{'' if keep else 'Connection: close' + chr(13) + chr(10)}\r\n").encode()

    async def _page(self, status: int, keep: bool, method: str) -> bool:
        title = f"{status} {HTTPStatus(status).phrase}"
        body = _PAGE.format(title=title, filler="").encode()
        return await self._send(status, "text/html; charset=utf-8", body, keep, 1e9, "",
                                method)

    async def _send(self, status: int, ctype: str, body: bytes, keep: bool, rate: float,
                    extra: str, method: str) -> bool:
        """Headers, then the body in chunks paced to the host's rate."""
        loop = asyncio.get_running_loop()
        self._write(self._head(status, ctype, len(body), keep, extra))
        if method != "HEAD":
            view = memoryview(body)
            started = loop.time()
            for offset in range(0, len(body), CHUNK):
                piece = view[offset:offset + CHUNK]
                # Each chunk leaves when the rate says it has arrived, so the last one ends
                # the transfer on time (and the client cannot close before we count it).
                due = started + (offset + len(piece)) / rate - loop.time()
                if due > 0.001:
                    await asyncio.sleep(due)
                if self.closed:
                    return False
                self._write(piece)
                await self._drain()
        if self.closed:
            return False
        self._finish_row("sent")
        return keep


def listening_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve_web(args: argparse.Namespace) -> None:
    world = World(load_plan(args.plan), Path(args.certs))
    loop = asyncio.get_running_loop()

    def quiet(_loop, context: dict) -> None:
        """Failed handshakes are the point of some hosts: not logged."""
        text = f"{context.get('message', '')} {context.get('exception', '')}"
        if "handshake" in text.lower() or "ssl" in text.lower():
            return
        if not isinstance(context.get("exception"), ConnectionError | OSError):
            print(f"web server: {text}", file=sys.stderr, flush=True)

    loop.set_exception_handler(quiet)
    loop.add_signal_handler(signal.SIGUSR1, setattr, world, "lab", True)
    loop.add_signal_handler(signal.SIGUSR2, setattr, world, "lab", False)
    servers = [await loop.create_server(lambda: Connection(world, False),
                                        sock=listening_socket(80)),
               await loop.create_server(lambda: Connection(world, True),
                                        sock=listening_socket(443), ssl=world.ssl,
                                        ssl_handshake_timeout=15)]
    print(json.dumps({"ready": "web", "pid": os.getpid(), "index": args.index}), flush=True)
    while True:
        await asyncio.sleep(1.0)
        done, world.done = world.done, []
        print(json.dumps({"t": round(time.time(), 3), "conns": world.conns,
                          "reqs": world.requests_active + world.setup,
                          "requests": world.requests, "accepted": world.accepted,
                          "done": done}), flush=True)
    del servers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("dns", "web"))
    parser.add_argument("--plan", required=True)
    parser.add_argument("--listen", default="198.19.0.1")
    parser.add_argument("--certs", default=".")
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    runner = event_loop_runner()
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        runner(serve_dns(args) if args.role == "dns" else serve_web(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
