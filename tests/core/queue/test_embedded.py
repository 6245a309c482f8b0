"""The embedded server and connections: private, persistent, reachable by URL, TLS and AUTH."""

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from laion_dagster.core.queue import embedded
from laion_dagster.core.queue.connection import RedisUnavailable, connect, redacted
from laion_dagster.core.settings import Settings


def test_embedded_server_is_private_and_shared(tmp_path):
    directory = tmp_path / "redis"
    server = embedded.ensure_running(directory)
    try:
        assert (directory / embedded.STATE_FILE).stat().st_mode & 0o077 == 0
        assert embedded.ensure_running(directory).pid == server.pid  # one server per directory
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        anonymous = redis.Redis(host="127.0.0.1", port=port)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    finally:
        embedded.stop(directory)


def test_queued_work_survives_a_restart(tmp_path):
    settings = Settings(data_dir=tmp_path)
    client = connect(settings)
    client.xadd("laion:tasks", {"d": b"shard"})
    client.close()
    assert embedded.stop(settings.redis_dir)
    client = connect(settings)  # starts it again from its append-only file
    try:
        assert client.xlen("laion:tasks") == 1
    finally:
        client.close()
        embedded.stop(settings.redis_dir)


def test_configured_url_with_password_is_used(redis_server, tmp_path):
    settings = Settings(data_dir=tmp_path, redis_url=redis_server.url)
    client = connect(settings)
    assert client.ping()
    client.close()
    assert not (tmp_path / "redis").exists()  # no embedded server was started


def test_unreachable_redis_is_a_clear_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(data_dir=tmp_path, redis_url=f"redis://:secret@127.0.0.1:{port}/0")
    with pytest.raises(RedisUnavailable) as error:
        connect(settings, retries=1)
    assert f"127.0.0.1:{port}" in str(error.value) and "secret" not in str(error.value)
    assert redacted("redis://:pw@h:1/0") == "redis://***@h:1/0"


def _tls_proxy(cert, key, target_port):
    """A TLS terminator in front of the plain embedded server, like a managed Redis's."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def serve():
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                tls = context.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                continue
            upstream = socket.create_connection(("127.0.0.1", target_port))
            threading.Thread(target=pump, args=(tls, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, tls), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_rediss_url_connects_over_tls(redis_server, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True)
    target = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    password = redis_server.url.split("://:", 1)[1].split("@", 1)[0]
    listener = _tls_proxy(str(cert), str(key), target)
    port = listener.getsockname()[1]
    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        client = connect(Settings(data_dir=tmp_path, redis_url=url))
        assert client.ping()
        assert client.connection_pool.connection_class.__name__ == "SSLConnection"
        client.close()
    finally:
        listener.close()
    os.environ.pop("LAION_REDIS_URL", None)


def test_a_restarted_server_comes_back_at_the_same_address(tmp_path):
    """Workers and runs hold the URL they started with: after a crash or a stop, the server
    must come back where they are knocking, with the same password, and its data."""
    directory = tmp_path / "redis"
    first = embedded.ensure_running(directory)
    client = redis.Redis.from_url(first.url, retry=Retry(ExponentialBackoff(cap=0.5), 20),
                                  retry_on_error=[redis.ConnectionError])
    try:
        client.set("kept", "yes")
        time.sleep(1.2)  # appendfsync everysec
        os.kill(first.pid, signal.SIGKILL)  # a crash, not a clean stop
        second = embedded.ensure_running(directory)
        assert second.url == first.url and second.pid != first.pid
        assert client.get("kept") == b"yes"  # the old client reconnects by itself
        embedded.stop(directory)
        third = embedded.ensure_running(directory)
        assert third.url == first.url
        assert client.get("kept") == b"yes"
    finally:
        client.close()
        embedded.stop(directory)
