"""A real S3 API server on loopback for the tests (moto's server mode, a test dependency), and
the ways a user's own tools would look into its buckets (boto3, which moto brings along)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3

# Credentials as a user exports them; never an instance-metadata lookup on this machine.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "laion-test", "AWS_SECRET_ACCESS_KEY": "laion-test-secret",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """moto's S3 server, started on a free loopback port; each test takes a bucket of its own."""

    def __init__(self, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(sys.executable).with_name("moto_server")
        self.log = open(log, "ab")  # noqa: SIM115 - held for the server's lifetime
        self.proc = subprocess.Popen([str(script), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **AWS_ENV})
        deadline = time.monotonic() + 60
        while True:  # until it accepts connections (it imports for about a second)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None, f"moto_server exited; see {log}"
                assert time.monotonic() < deadline, "moto_server did not start in 60 s"
                time.sleep(0.05)
        self.client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                                   aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])

    def bucket(self) -> str:
        name = f"laion-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix`: key -> size."""
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix):
            found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return found

    def pending_uploads(self, bucket: str) -> list[str]:
        """Keys of multipart uploads begun and neither completed nor aborted."""
        answer = self.client.list_multipart_uploads(Bucket=bucket)
        return [u["Key"] for u in answer.get("Uploads", [])]

    def mirror(self, bucket: str, prefix: str, into: Path) -> Path:
        """Download everything under `prefix` into a local folder, as `aws s3 sync` would."""
        for key in self.keys(bucket, prefix):
            if key.endswith("/"):  # a "folder" marker object, as consoles make
                continue
            target = into / key[len(prefix):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(bucket, key, str(target))
        return into

    def upload_tree(self, folder: Path, bucket: str, prefix: str) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(folder).as_posix()}"
                self.client.upload_file(str(path), bucket, key)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def s3_env(server: S3Server) -> dict[str, str]:
    """What a user with a MinIO-like server exports: the SDKs' own variables, no flag."""
    return {**AWS_ENV, "AWS_ENDPOINT_URL": server.url}


def serve(tmp_path_factory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


class HoldingProxy:
    """An HTTP proxy in front of the S3 server that holds the requests `hold(method, path)`
    picks until `release` is set (a worker can be killed while its upload is under way), and
    answers 503 to those `fail(method, path)` picks while `failing` is set (an outage)."""

    def __init__(self, target: S3Server, hold=lambda method, path: False,
                 fail=lambda method, path: False):
        import http.client
        import http.server
        import threading

        self.held = threading.Event()  # a request has been held
        self.release = threading.Event()
        self.failing = threading.Event()
        self.failed = 0  # requests answered 503
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.failing.is_set() and fail(self.command, self.path):
                    proxy.failed += 1
                    message = b"<Error><Code>ServiceUnavailable</Code></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                if hold(self.command, self.path):
                    proxy.held.set()
                    proxy.release.wait()
                upstream = http.client.HTTPConnection("127.0.0.1", target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding",
                                            "connection", "server", "date"):
                        self.send_header(name, value)
                # A HEAD answer's length is the object's, with no body.
                self.send_header("Content-Length", answer.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            def _answer(self) -> None:
                try:
                    self._forward()
                except OSError:  # the client was killed or gave up: nothing to answer
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
