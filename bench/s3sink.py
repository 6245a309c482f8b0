"""A fast S3 API server for benchmarks: objects go to files in a folder, nothing else.

    python -m bench.s3sink --root DIR --port 9100

moto (what the tests use) is faithful but heavy per uploaded byte, so on a machine of few
cores it, not the client, is the limit of a loopback benchmark. This server does
only what a shard upload needs, in aiohttp, with bodies streamed to disk: PutObject, the four
multipart calls, HeadObject, GetObject (with Range), DeleteObject, HeadBucket and
ListObjectsV2 (prefix and delimiter). It checks no signature and keeps no metadata but size
and time. Not for anything but benchmarks on loopback.

S3Server starts it, or moto's server, as a process of a benchmark's (bench/bucket.py,
bench/s3clients.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import uuid
from email.utils import formatdate
from pathlib import Path
from xml.sax.saxutils import escape

from aiohttp import web

from bench.measure import Owned, bench_command, cpu_of, wait_for_port

CHUNK = 1 << 20
KEY, SECRET = "bench", "bench-secret"  # any will do: nothing checks them
AWS = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


class S3Server:
    """An S3 API server process of ours on a loopback port: this sink (`kind` "sink", its
    objects under `root`) or moto's server ("moto"); its CPU time, and buckets made in it."""

    def __init__(self, owned: Owned, kind: str, root: Path, port: int, log: Path):
        self.name = kind
        self.url = f"http://127.0.0.1:{port}"
        argv = (bench_command("s3sink", "--root", str(root), "--port", str(port))
                if kind == "sink" else
                [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                 str(port)])
        with open(log, "ab") as out:
            self.proc = owned.popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **AWS})
        wait_for_port(port, self.proc, f"{kind} (log: {log})")

    def cpu(self) -> float:
        return cpu_of([self.proc.pid])

    def make_bucket(self, bucket: str) -> None:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=self.url.removeprefix("http://"),
                               scheme="http", region="us-east-1", allow_bucket_creation=True,
                               access_key=KEY, secret_key=SECRET)
        fs.create_dir(bucket)


def _xml(body: str, status: int = 200) -> web.Response:
    return web.Response(text='<?xml version="1.0" encoding="UTF-8"?>' + body, status=status,
                        content_type="application/xml")


def _missing(kind: str = "NoSuchKey") -> web.Response:
    return _xml(f"<Error><Code>{kind}</Code><Message>not found</Message></Error>", 404)


async def _unchunk(content, out) -> None:
    """The payload of an aws-chunked body (what the SDKs send with a trailing checksum):
    `<hex size>[;extensions]\r\n<bytes>\r\n`, repeated, then `0\r\n`, trailers and a
    blank line. The checksum is not checked."""
    while True:
        line = await content.readline()
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await content.readline()).strip():
                pass  # trailers
            return
        out.write(await content.readexactly(size))
        await content.readexactly(2)


class Sink:
    def __init__(self, root: Path):
        self.root = root
        self.uploads = root / ".uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)

    def _path(self, bucket: str, key: str) -> Path:
        path = (self.root / bucket / key).resolve()
        if self.root.resolve() not in path.parents:
            raise web.HTTPBadRequest()
        return path

    async def _receive(self, request: web.Request, target: Path) -> str:
        """Stream the body to `target`; the ETag is made up (a digest would cost the sink more
        CPU than the upload costs the client, on the cores they share)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".part-{uuid.uuid4().hex[:8]}")
        chunked = "aws-chunked" in request.headers.get("Content-Encoding", "")
        with open(tmp, "wb") as out:
            if chunked:
                await _unchunk(request.content, out)
            else:
                async for chunk in request.content.iter_any():
                    out.write(chunk)
        os.replace(tmp, target)
        return uuid.uuid4().hex

    async def handle(self, request: web.Request) -> web.StreamResponse:
        bucket, _, key = request.match_info["path"].partition("/")
        query = request.query
        method = request.method
        if not key:
            if method == "GET":
                return self._list(bucket, query.get("prefix", ""), query.get("delimiter"))
            return web.Response(status=200)
        if key.endswith("/"):  # a "folder" marker (pyarrow makes them): a folder here
            await request.read()
            found = (self.root / bucket / key).is_dir() or method in ("PUT", "DELETE")
            return web.Response(status=200 if found else 404)
        path = self._path(bucket, key)
        if method == "POST" and "uploads" in query:
            upload = uuid.uuid4().hex
            (self.uploads / upload).mkdir()
            return _xml(f"<InitiateMultipartUploadResult><Bucket>{bucket}</Bucket><Key>"
                        f"{escape(key)}</Key><UploadId>{upload}</UploadId>"
                        "</InitiateMultipartUploadResult>")
        if method == "PUT" and "uploadId" in query:
            part = self.uploads / query["uploadId"] / f"{int(query['partNumber']):05d}"
            etag = await self._receive(request, part)
            return web.Response(headers={"ETag": f'"{etag}"'})
        if method == "POST" and "uploadId" in query:
            await request.read()
            folder = self.uploads / query["uploadId"]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".assembling")
            with open(tmp, "wb") as out:
                for piece in sorted(folder.iterdir()):
                    with open(piece, "rb") as source:
                        shutil.copyfileobj(source, out, CHUNK)
            os.replace(tmp, path)
            shutil.rmtree(folder)
            return _xml(f"<CompleteMultipartUploadResult><Bucket>{bucket}</Bucket><Key>"
                        f"{escape(key)}</Key><ETag>\"x\"</ETag></CompleteMultipartUploadResult>")
        if method == "DELETE" and "uploadId" in query:
            shutil.rmtree(self.uploads / query["uploadId"], ignore_errors=True)
            return web.Response(status=204)
        if method == "PUT":
            etag = await self._receive(request, path)
            return web.Response(headers={"ETag": f'"{etag}"'})
        if method == "DELETE":
            path.unlink(missing_ok=True)
            return web.Response(status=204)
        if not path.is_file():
            return web.Response(status=404) if method == "HEAD" else _missing()
        stat = path.stat()
        headers = {"Last-Modified": formatdate(stat.st_mtime, usegmt=True), "ETag": '"x"',
                   "Accept-Ranges": "bytes"}
        if method == "HEAD":
            headers["Content-Length"] = str(stat.st_size)
            return web.Response(headers=headers)
        start, end = 0, stat.st_size - 1
        ranged = request.headers.get("Range", "")
        if ranged.startswith("bytes="):
            first, _, last = ranged[6:].partition("-")
            start, end = int(first), min(int(last) if last else end, end)
        with open(path, "rb") as source:
            source.seek(start)
            body = source.read(end - start + 1)
        status = 206 if ranged else 200
        if ranged:
            headers["Content-Range"] = f"bytes {start}-{end}/{stat.st_size}"
        return web.Response(body=body, status=status, headers=headers)

    def _list(self, bucket: str, prefix: str, delimiter: str | None) -> web.Response:
        base = self.root / bucket
        keys, prefixes = [], set()
        # Walk only below the prefix's folder: a listing must not cost the whole bucket.
        start = base / prefix.rsplit("/", 1)[0] if "/" in prefix else base
        if start.is_dir():
            for folder, _, files in os.walk(start):
                for name in files:
                    key = (Path(folder) / name).relative_to(base).as_posix()
                    if not key.startswith(prefix) or ".part-" in name:
                        continue
                    rest = key[len(prefix):]
                    if delimiter and delimiter in rest:
                        prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
                    else:
                        keys.append(key)
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><Size>{(base / k).stat().st_size}</Size>"
            f"<LastModified>{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime())}"
            "</LastModified><ETag>\"x\"</ETag><StorageClass>STANDARD</StorageClass></Contents>"
            for k in sorted(keys))
        common = "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>"
                         for p in sorted(prefixes))
        return _xml(f"<ListBucketResult><Name>{bucket}</Name><Prefix>{escape(prefix)}</Prefix>"
                    f"<KeyCount>{len(keys) + len(prefixes)}</KeyCount><MaxKeys>1000</MaxKeys>"
                    f"<IsTruncated>false</IsTruncated>{contents}{common}</ListBucketResult>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    sink = Sink(args.root)
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{path:.*}", sink.handle)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
