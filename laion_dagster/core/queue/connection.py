"""Redis clients that survive a server restart.

Every client retries connection errors with exponential backoff, so a worker, a sensor or an
enqueue carries on after Redis restarts instead of dying with a traceback. `rediss://` URLs
give TLS and a password in the URL gives AUTH, as redis-py parses them.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from laion_dagster.core.queue import embedded
from laion_dagster.core.settings import Settings

RETRIES = 8  # ~25 s of backoff in total before an error reaches the caller


class RedisUnavailable(RuntimeError):
    """Redis cannot be reached; the message names the URL without its password."""


def redis_url(settings: Settings) -> str:
    """The configured URL, or the embedded server's (started on first use)."""
    if settings.redis_url:
        return settings.redis_url
    return embedded.ensure_running(settings.redis_dir).url


def redacted(url: str) -> str:
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def _options(asynchronous: bool, name: str, retries: int = RETRIES) -> dict:
    """One set of client options for the synchronous and the asyncio client alike."""
    if asynchronous:
        from redis.asyncio.retry import Retry
    else:
        from redis.retry import Retry
    return {
        "retry": Retry(ExponentialBackoff(cap=5.0, base=0.2), retries),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "health_check_interval": 15,
        "client_name": name,
    }


def connect(settings: Settings, name: str = "laion-dagster",
            retries: int = RETRIES) -> redis.Redis:
    """A synchronous client; raises RedisUnavailable (password hidden) if it cannot connect.

    Long-running processes keep the default budget so they ride out a Redis restart; a
    command a person waits on passes fewer retries and answers within seconds.
    """
    url = redis_url(settings)
    client = redis.Redis.from_url(url, **_options(False, name, retries))
    try:
        client.ping()
    except redis.RedisError as error:
        raise RedisUnavailable(f"cannot reach Redis at {redacted(url)}: {error}") from error
    return client


def connect_async(settings: Settings, name: str = "laion-dagster-worker") -> aioredis.Redis:
    return aioredis.Redis.from_url(redis_url(settings), **_options(True, name))
