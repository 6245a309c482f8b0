"""Resolving host names as the real web needs it, against a real DNS server on loopback.

The server (laion_dagster.demo.dns) answers names under `.test` like a recursive resolver:
some after a delay, some with NXDOMAIN, some never. Nothing else is ever asked.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from laion_dagster.core.fetch import resolve
from laion_dagster.core.fetch.fetcher import Fetcher
from laion_dagster.core.fetch.resolve import CachingResolver, LookupFailed
from laion_dagster.demo.dns import DnsServer, Name


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture
def dns():
    names = {f"fast{i}.test": Name("127.0.0.2") for i in range(300)}
    names.update({
        "img-a.test": Name("127.0.0.1"),
        "slow.test": Name("127.0.0.3", delay=2.5),
        "shared.test": Name("127.0.0.4", delay=0.5),
        "nx.test": Name(None),
        "silent.test": Name("127.0.0.5", silent=True),
    })
    names.update({f"slow{i}.test": Name("127.0.0.6", delay=0.3) for i in range(200)})
    with DnsServer(names) as server:
        yield server


def test_many_slow_names_resolve_side_by_side_not_one_after_another(dns):
    """200 names that each take 0.3 s resolve in about that, not 200 × 0.3 s over a handful
    of threads: one slow name holds up no other fetch."""
    async def main():
        resolver = CachingResolver(deadline=10, nameservers=[dns.address])
        started = time.monotonic()
        answers = await asyncio.gather(*(resolver.resolve(f"slow{i}.test", 443)
                                         for i in range(200)))
        elapsed = time.monotonic() - started
        await resolver.close()
        return answers, elapsed

    answers, elapsed = run(main())
    assert all(a[0]["host"] == "127.0.0.6" and a[0]["port"] == 443 for a in answers)
    assert elapsed < 3.0


def test_answers_reach_the_loop_without_a_thread_of_c_ares(dns):
    """c-ares's sockets are watched by the event loop itself. With pycares 5, aiodns would run
    a thread per resolver whose every answer takes the GIL from the loop and wakes it again:
    a context switch or two per row that the web's scattered answers make expensive."""
    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    async def main():
        warm = CachingResolver(deadline=10, nameservers=[dns.address])
        await warm.resolve("fast0.test")  # pycares starts its one shared helper thread here
        before = threads()
        resolver = CachingResolver(deadline=10, nameservers=[dns.address])
        answers = await asyncio.gather(*(resolver.resolve(f"fast{i}.test") for i in range(1, 50)))
        during = threads()
        await resolver.close()
        await warm.close()
        return answers, before, during

    answers, before, during = run(main())
    assert {a[0]["host"] for a in answers} == {"127.0.0.2"}
    assert during == before


def test_one_look_up_per_name_and_the_answer_is_cached(dns):
    async def main():
        resolver = CachingResolver(deadline=10, nameservers=[dns.address])
        first = await asyncio.gather(*(resolver.resolve("shared.test", 80) for _ in range(50)))
        later = await resolver.resolve("shared.test", 443)
        await resolver.close()
        return first, later

    first, later = run(main())
    assert {a[0]["host"] for a in first} == {"127.0.0.4"}
    assert later[0]["host"] == "127.0.0.4" and later[0]["port"] == 443
    assert dns.queries["shared.test"] == 1  # fifty fetches, one question


def test_a_name_that_does_not_exist_fails_at_once_and_is_not_asked_again(dns):
    async def main():
        resolver = CachingResolver(deadline=10, nameservers=[dns.address])
        failures = []
        for _ in range(3):
            with pytest.raises(LookupFailed) as error:
                await resolver.resolve("nx.test", 80)
            failures.append(error.value)
        await resolver.close()
        return failures

    failures = run(main())
    assert isinstance(failures[0], OSError)  # what aiohttp reports as a DNS error
    assert "nx.test" in str(failures[0]) and "not found" in str(failures[0]).lower()
    assert dns.queries["nx.test"] == 1


def test_a_slow_name_still_resolves_after_many_fast_answers(dns):
    """c-ares shortens its timeouts after fast answers (250 ms, then doubling); a name whose
    resolver takes 2.5 s must still resolve within the look-up deadline."""
    async def main():
        resolver = CachingResolver(deadline=10, nameservers=[dns.address])
        await asyncio.gather(*(resolver.resolve(f"fast{i}.test") for i in range(300)))
        started = time.monotonic()
        answer = await resolver.resolve("slow.test", 80)
        elapsed = time.monotonic() - started
        await resolver.close()
        return answer, elapsed

    answer, elapsed = run(main())
    assert answer[0]["host"] == "127.0.0.3"
    assert 2.4 <= elapsed < 5


def test_an_unanswered_name_fails_at_its_deadline_once_for_everyone(dns):
    async def main():
        resolver = CachingResolver(deadline=2.0, nameservers=[dns.address])
        started = time.monotonic()
        results = await asyncio.gather(*(resolver.resolve("silent.test", 80) for _ in range(20)),
                                       return_exceptions=True)
        elapsed = time.monotonic() - started
        again = time.monotonic()
        with pytest.raises(LookupFailed):
            await resolver.resolve("silent.test", 80)
        cached = time.monotonic() - again
        await resolver.close()
        return results, elapsed, cached

    results, elapsed, cached = run(main())
    assert all(isinstance(r, LookupFailed) for r in results)
    assert "silent.test" in str(results[0]) and "2s" in str(results[0])
    assert 1.9 <= elapsed < 3.5
    assert cached < 0.1  # remembered, not asked for another 2 s


def test_an_unanswered_name_is_asked_again_once_its_failure_is_forgotten(dns):
    """A look-up that timed out is remembered for `failed_ttl` only: a row tried again later
    (retry_rounds, whose delay is longer) asks the name server again, not the memory."""
    async def main():
        resolver = CachingResolver(deadline=0.5, nameservers=[dns.address], failed_ttl=0.3)
        for _ in range(2):  # asked once, then answered from memory
            with pytest.raises(LookupFailed):
                await resolver.resolve("silent.test", 80)
        asked_before = resolver.lookups
        forgotten = asyncio.get_running_loop().time() + 0.3
        await asyncio.sleep(max(0.0, forgotten - asyncio.get_running_loop().time()) + 0.05)
        with pytest.raises(LookupFailed):
            await resolver.resolve("silent.test", 80)
        await resolver.close()
        return asked_before, resolver.lookups

    asked_before, asked_after = run(main())
    assert asked_after > asked_before


def test_the_fetcher_resolves_through_dns_and_keeps_the_address_guard(dns, settings,
                                                                     image_server, images):
    """Without a host_map the fetcher asks DNS; an address the guard refuses stays refused
    (127.0.0.1 is allowed here by name, 127.0.0.2 is not)."""
    real = settings.model_copy(update={
        "host_map": {}, "dns_servers": [dns.address], "allow_private_addresses": False,
        "allowed_networks": ["127.0.0.1/32"]})
    url = f"http://img-a.test:{image_server.port}{images[0].path}"
    refused = f"http://fast1.test:{image_server.port}{images[0].path}"
    missing = f"http://nx.test:{image_server.port}{images[0].path}"

    async def main():
        async with Fetcher(real) as fetcher:
            return await asyncio.gather(fetcher.fetch(url), fetcher.fetch(refused),
                                        fetcher.fetch(missing))

    ok, blocked, nxdomain = run(main())
    assert ok.ok and ok.body == images[0].body
    assert blocked.error_class == "blocked_address"
    assert nxdomain.error_class == "dns" and "nx.test" in nxdomain.error_message


def test_the_cache_is_bounded_and_keeps_the_newest_names(dns, monkeypatch):
    """A weeks-long run meets millions of names: the cache stays under its bound, and the
    names just asked are still answered from it."""
    monkeypatch.setattr(resolve, "CACHE_ENTRIES", 100)

    async def main():
        resolver = CachingResolver(deadline=10, nameservers=[dns.address])
        for i in range(300):
            await resolver.resolve(f"fast{i}.test", 80)
        size, asked = len(resolver._cache), resolver.lookups
        again = await resolver.resolve("fast299.test", 80)
        cached = resolver.lookups == asked
        await resolver.close()
        return size, again, cached

    size, again, cached = run(main())
    assert size <= 100
    assert again[0]["host"] == "127.0.0.2" and cached
