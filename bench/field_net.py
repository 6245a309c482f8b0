"""The simulated internet's plumbing for bench/field.py: namespaces, routes, drop rules, TLS.

Two network namespaces joined by one veth pair, and nothing else: no default route, no link to
the machine's interfaces, so no packet can leave them whatever a tool does.

    fieldclient  lo (127.0.0.1, for our tool's embedded Redis) + fieldc0 198.19.0.2/24,
                 route 198.18.0.0/16 via 198.19.0.1; /etc/netns/fieldclient/resolv.conf names
                 198.19.0.1 as the only DNS server (`ip netns exec` mounts it over /etc)
    fieldweb     fieldw0 198.19.0.1/24 (the DNS server listens here), and every address of
                 198.18.0.0/16 local at once (`ip route add local 198.18.0.0/16 dev lo`: one
                 listening socket on 0.0.0.0 accepts for all of them, and getsockname() says
                 which one a client dialled, so each can have its own round trip and rate)

Only 198.18.0.0/15 (RFC 2544, reserved for benchmarks) is used. An nftables table in each
namespace accepts only loopback and 198.18.0.0/15 on output (a guard on top of the missing
routes), and in fieldweb address sets make hosts fail below HTTP: `blackhole` (dropped: the
client's connect times out), `refused` (a TCP reset), `unreachable` (ICMP host unreachable,
"no route to host"), `closed_http` (port 80 resets, 443 serves) and `flapping` (empty until
bench/field.py puts a host in it for a few seconds of a run: every packet to it resets, as a
CDN dropping connections during a deploy).

Certificates: a test CA and three server certificates, all ECDSA P-256 (cheap handshakes for
the servers): `*.sim.test` signed by the CA, `*.elsewhere.test` signed by the CA (a wrong
name) and a self-signed `*.sim.test` (untrusted); the web server picks one by SNI. Clients
trust the CA through a copy of the machine's whole CA bundle with the test CA appended
(bench/measure.py's trust_bundle says why).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.measure import trust_bundle

WEB_NS = "fieldweb"
CLIENT_NS = "fieldclient"
WEB_IF, CLIENT_IF = "fieldw0", "fieldc0"
WEB_LINK_IP, CLIENT_LINK_IP = "198.19.0.1", "198.19.0.2"
DNS_IP = WEB_LINK_IP
HOST_NET = "198.18.0.0/16"  # where the web's hosts live
BENCH_NET = "198.18.0.0/15"  # everything the namespaces ever use
NETNS_ETC = Path("/etc/netns")
LOCK_FILE = Path(tempfile.gettempdir()) / "laion-field-bench.lock"
DOMAIN = "sim.test"


def run(*argv: str, check: bool = True, input_: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, input=input_)


def in_ns(ns: str, argv: list[str]) -> list[str]:
    """`argv` run inside namespace `ns` (ip execs it: the pid is the command's own)."""
    return ["ip", "netns", "exec", ns, *argv]


def preflight() -> list[str]:
    """What is missing to build the simulation; empty when all is there."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, /etc/netns)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("openssl", "openssl")):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` not found: apt-get install -y {package}")
    if not Path("/etc/resolv.conf").exists():
        problems.append("/etc/resolv.conf must exist (ip netns exec mounts over it)")
    return problems


class Lock:
    """One field benchmark at a time: its start-up clears whatever another run left."""

    def __init__(self) -> None:
        self.handle = open(LOCK_FILE, "w")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another field benchmark holds {LOCK_FILE}") from None


# ---------------------------------------------------------------- namespaces

def ns_exists(ns: str) -> bool:
    return ns in run("ip", "netns", "list", check=False).stdout.split()


def ns_pids(ns: str) -> list[int]:
    if not ns_exists(ns):
        return []
    out = run("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_ns_processes(ns: str, grace: float = 3.0) -> list[int]:
    """Stop every process left in one of our namespaces (only this script starts any there)."""
    pids = ns_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and ns_pids(ns):
        time.sleep(0.1)
    for pid in ns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def teardown() -> None:
    """Remove everything setup() makes; harmless when some or all of it is gone already."""
    for ns in (CLIENT_NS, WEB_NS):
        kill_ns_processes(ns)
        if ns_exists(ns):
            run("ip", "netns", "del", ns, check=False)
    for ns in (CLIENT_NS, WEB_NS):
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    with contextlib.suppress(OSError):
        NETNS_ETC.rmdir()  # only when empty: someone else's namespaces may live there


def setup(blackhole: list[str], refused: list[str], unreachable: list[str],
          closed_http: list[str] = ()) -> None:
    teardown()
    for ns in (WEB_NS, CLIENT_NS):
        run("ip", "netns", "add", ns)
    run("ip", "link", "add", WEB_IF, "netns", WEB_NS, "type", "veth", "peer", "name",
        CLIENT_IF, "netns", CLIENT_NS)
    web = ["ip", "-n", WEB_NS]
    client = ["ip", "-n", CLIENT_NS]
    run(*web, "link", "set", "lo", "up")
    run(*web, "addr", "add", f"{WEB_LINK_IP}/24", "dev", WEB_IF)
    run(*web, "link", "set", WEB_IF, "up")
    run(*web, "route", "add", "local", HOST_NET, "dev", "lo")
    run(*client, "link", "set", "lo", "up")
    run(*client, "addr", "add", f"{CLIENT_LINK_IP}/24", "dev", CLIENT_IF)
    run(*client, "link", "set", CLIENT_IF, "up")
    run(*client, "route", "add", HOST_NET, "via", WEB_LINK_IP)
    for ns, extra in ((CLIENT_NS, ""), (WEB_NS, _failure_rules(blackhole, refused,
                                                               unreachable, closed_http))):
        run(*in_ns(ns, ["nft", "-f", "-"]), input_=_ruleset(extra))
    # The kernel rate-limits the ICMP errors it sends (per peer: a burst, then one a second),
    # and every "unreachable" host answers the one client: without this, most of their
    # rejects were dropped and the client's connects timed out instead of failing at once.
    run(*in_ns(WEB_NS, ["sysctl", "-q", "-w", "net.ipv4.icmp_ratelimit=0",
                        "net.ipv4.icmp_msgs_per_sec=100000", "net.ipv4.icmp_msgs_burst=100000"]))
    etc = NETNS_ETC / CLIENT_NS
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text(f"# bench/field.py: the simulated internet's DNS\n"
                                     f"nameserver {DNS_IP}\n")
    check_isolated()


def _elements(addresses: list[str]) -> str:
    return f"elements = {{ {', '.join(addresses)} }}" if addresses else ""


def _failure_rules(blackhole: list[str], refused: list[str], unreachable: list[str],
                   closed_http: list[str]) -> str:
    return f"""
    set blackhole {{ type ipv4_addr; {_elements(blackhole)} }}
    set refused {{ type ipv4_addr; {_elements(refused)} }}
    set unreachable {{ type ipv4_addr; {_elements(unreachable)} }}
    set closed_http {{ type ipv4_addr; {_elements(closed_http)} }}
    set flapping {{ type ipv4_addr; }}
    chain input {{
        type filter hook input priority 0; policy accept;
        ip daddr @blackhole drop
        ip daddr @refused meta l4proto tcp reject with tcp reset
        ip daddr @unreachable reject with icmp type host-unreachable
        ip daddr @closed_http tcp dport 80 reject with tcp reset
        ip daddr @flapping meta l4proto tcp reject with tcp reset
    }}"""


def flap(address: str, down: bool) -> None:
    """Put `address` in the `flapping` set (every connection to it resets) or take it out."""
    verb = "add" if down else "delete"
    run(*in_ns(WEB_NS, ["nft", verb, "element", "inet", "field", "flapping",
                        f"{{ {address} }}"]), check=down)


def _ruleset(extra: str) -> str:
    return f"""table inet field {{
    chain output {{
        type filter hook output priority 0; policy drop;
        oifname "lo" accept
        ip daddr {BENCH_NET} accept
    }}{extra}
}}
"""


def check_isolated() -> None:
    """Refuse to go on unless each namespace routes nothing but 198.18.0.0/15 (and lo)."""
    for ns in (WEB_NS, CLIENT_NS):
        routes = run("ip", "-n", ns, "-4", "route", "show", "table", "all").stdout.splitlines()
        for line in routes:
            words = line.split()
            if not words or "default" in words:
                if words:
                    raise RuntimeError(f"{ns} has a default route: {line}")
                continue
            target = words[1] if words[0] in ("local", "broadcast", "unreachable") else words[0]
            if target.startswith(("127.", "198.18.", "198.19.")):
                continue
            raise RuntimeError(f"{ns} routes outside 198.18.0.0/15: {line}")
        links = run("ip", "-n", ns, "-o", "link", "show").stdout
        names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
        if names - {"lo", WEB_IF, CLIENT_IF}:
            raise RuntimeError(f"{ns} has unexpected interfaces: {sorted(names)}")


# ---------------------------------------------------------------- certificates

def _openssl(*argv: str) -> None:
    run("openssl", *argv)


def _ec_request(directory: Path, name: str, subject: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(directory / f"{name}.key"), "-out",
             str(directory / f"{name}.csr"), "-subj", subject)


def make_certs(directory: Path) -> Path:
    """The CA, the three server certificates, and the trust bundle; returns the bundle."""
    directory.mkdir(parents=True, exist_ok=True)
    d = directory
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "3",
             "-subj", "/CN=laion-dagster field benchmark CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, san in (("server", f"DNS:*.{DOMAIN},DNS:{DOMAIN}"),
                      ("wrongname", "DNS:*.elsewhere.test,DNS:elsewhere.test")):
        _ec_request(d, name, f"/CN={san.split(',')[0][4:]}")
        ext = d / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                       "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                       "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(ext), "-out", str(d / f"{name}.pem"))
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(d / "untrusted.key"), "-out", str(d / "untrusted.pem"),
             "-days", "2", "-subj", f"/CN=*.{DOMAIN}",
             "-addext", f"subjectAltName=DNS:*.{DOMAIN},DNS:{DOMAIN}")
    return trust_bundle(d / "ca.pem", d / "ca-bundle.pem")
