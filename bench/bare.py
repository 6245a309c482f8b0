"""The bare aiohttp loop: the least a downloader can do, the yardstick of bench/compare.py and
bench/field.py, which start one process of it per process of the tool under test.

    python -m bench.bare loopback --urls LIST --out DIR --cafile CA [--index I --nproc N ...]
    python -m bench.bare field --urls LIST --out DIR [--index I --nproc N ...] [--dns-tries N]

A process takes every nproc-th line of LIST from `index`, keeps `concurrency` fetches in flight
with one SSL context and writes each body to a file of its own under DIR/p<index>.

loopback: LIST has one URL a line, with IP addresses (a name is never resolved); the CA file is
--cafile. It prints `ready` once started and waits for a line on stdin, so that the caller
times start-up and work apart, and prints its counts as one JSON line at the end.

field: LIST has `row<TAB>url` lines; names are resolved with aiodns and aiohttp's DNS cache, the
CA bundle is SSL_CERT_FILE's. Each answer is judged as ours judges it (the status, an
`X-Robots-Tag: noai`, an image's magic bytes) and each row's class written as a JSON line to
DIR/results-<index>.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import resource
import socket
import ssl
import sys
import time
from collections import Counter
from pathlib import Path

IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def looks_like_image(body: bytes) -> bool:
    return body.startswith(IMAGE_MAGIC) or body[8:12] == b"WEBP"


async def fetch_all(items: list, concurrency: int, connector, timeout, fetch,
                    started=None) -> None:
    """`fetch(session, item)` for every item, `concurrency` at a time; `started`, awaited
    once the session is up, holds the work back until it returns."""
    import aiohttp

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        todo = iter(items)

        async def fetcher() -> None:
            for item in todo:
                await fetch(session, item)

        if started is not None:
            await started()
        await asyncio.gather(*(fetcher() for _ in range(concurrency)))


def loopback(args: argparse.Namespace, lines: list[str], files: Path) -> None:
    import aiohttp
    from aiohttp.abc import AbstractResolver

    class NoResolver(AbstractResolver):  # IP URLs only: a name must never reach DNS
        async def resolve(self, host, port=0, family=socket.AF_INET):
            raise OSError(f"bare loop: refusing to resolve {host!r}")

        async def close(self):
            return None

    counts: Counter[str] = Counter()
    total = [0]

    async def fetch(session, url: str) -> None:
        try:
            async with session.get(url) as response:
                body = await response.read()
                if response.status != 200:
                    counts[f"http {response.status}"] += 1
                    return
            with open(files / url.rsplit("/", 1)[1], "wb") as handle:
                handle.write(body)
            counts["ok"] += 1
            total[0] += len(body)
        except Exception as error:  # counted, never fatal
            counts[type(error).__name__] += 1

    async def go() -> None:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def run() -> None:
        connector = aiohttp.TCPConnector(limit=args.concurrency, resolver=NoResolver(),
                                         ssl=ssl.create_default_context(cafile=args.cafile))
        await fetch_all(lines, args.concurrency, connector, aiohttp.ClientTimeout(total=30),
                        fetch, go)

    runner(args.loop)(run())
    ok = counts.pop("ok", 0)
    print(json.dumps({"ok": ok, "failed": sum(counts.values()), "bytes": total[0],
                      "errors": dict(counts)}), flush=True)


def classify(error: BaseException) -> str:
    import aiohttp

    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return "dns"
    if isinstance(error, aiohttp.ClientSSLError | ssl.SSLError):
        return "tls"
    if isinstance(error, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(error, aiohttp.ClientError | OSError):
        return "connection"
    return "other"


def field(args: argparse.Namespace, lines: list[str], files: Path) -> None:
    import aiohttp

    results = open(files.parent / f"results-{args.index}.jsonl", "w")  # noqa: SIM115
    counts: Counter[str] = Counter()
    # c-ares's defaults unless asked: since 1.32 it scales its timeout to the server's recent
    # latency (5x, at least 250 ms, doubling per try, 3 tries), so after many fast answers a
    # name that takes ~2 s to resolve fails; more tries give such names time.
    resolver = {"tries": args.dns_tries} if args.dns_tries else {}

    async def fetch(session, line: str) -> None:
        row, url = line.split("\t", 1)
        detail = ""
        try:
            async with asyncio.timeout(30), session.get(url) as response:
                if response.status != 200:
                    kind = f"http_{response.status // 100}xx"
                    detail = str(response.status)
                elif "noai" in ",".join(response.headers.getall("X-Robots-Tag", [])).lower():
                    kind = "opted_out"
                else:
                    body = await response.read()
                    kind = "ok" if looks_like_image(body) else "not_image"
                    if kind == "ok":
                        with open(files / row, "wb") as handle:
                            handle.write(body)
        except Exception as error:  # classified, never fatal
            kind = classify(error)
            detail = f"{type(error).__name__}: {error}"[:200]
        counts[kind] += 1
        results.write(json.dumps([int(row), kind, detail, round(time.time(), 3)]) + "\n")

    async def run() -> None:
        connector = aiohttp.TCPConnector(limit=args.concurrency, ssl=ssl.create_default_context(),
                                         resolver=aiohttp.AsyncResolver(**resolver),
                                         use_dns_cache=True, ttl_dns_cache=300)
        await fetch_all(lines, args.concurrency, connector,
                        aiohttp.ClientTimeout(total=None, sock_connect=10), fetch)

    runner(args.loop)(run())
    results.close()
    print(json.dumps(dict(counts)), flush=True)


def runner(loop: str | None):
    """uvloop's run, as our workers use it, unless asyncio's is asked for or uvloop missing."""
    if loop != "asyncio" and importlib.util.find_spec("uvloop"):
        import uvloop

        return uvloop.run
    return asyncio.run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("flavour", choices=("loopback", "field"))
    parser.add_argument("--urls", required=True, help="the list of URLs (see above)")
    parser.add_argument("--out", required=True, help="the folder bodies are written under")
    parser.add_argument("--index", type=int, default=0, help="this process's number")
    parser.add_argument("--nproc", type=int, default=1, help="how many processes share LIST")
    parser.add_argument("--concurrency", type=int, default=64, help="fetches in flight")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default=None,
                        help="default: uvloop if installed")
    parser.add_argument("--cafile", help="loopback: the CA file to trust")
    parser.add_argument("--dns-tries", type=int, default=0,
                        help="field: c-ares tries (default: c-ares's own)")
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    lines = Path(args.urls).read_text().splitlines()[args.index::args.nproc]
    files = Path(args.out) / f"p{args.index}"
    files.mkdir(parents=True, exist_ok=True)
    (loopback if args.flavour == "loopback" else field)(args, lines, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
