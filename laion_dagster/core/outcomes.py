"""What a row's failure means: its class, whether it may pass, and what a user can do about it.

Every view of a part (`run`'s summary, `status`, the part's Dagster metadata) reads these
tables, so they say the same thing in the same words. No imports from the rest of the package:
the settings model validates class names against ERROR_CLASSES.
"""

from __future__ import annotations

# Every class a row can fail with (fetch/fetcher.py's classify, images/checks.py, the queue's
# dead letters, parts' invalid rows): the error table and the asset metadata list them in this
# order.
ERROR_CLASSES = ("timeout", "dns", "connection", "tls", "http_4xx", "http_5xx", "too_large",
                 "redirect", "not_image", "decode_error", "opted_out", "hash_mismatch",
                 "filtered", "blocked_address", "invalid_url", "dead_letter")

# Not a class of its own (a 429 is http_4xx): a name the retry settings accept for "the
# server asked us to slow down".
TOO_MANY_REQUESTS = "http_429"
RETRY_CLASS_NAMES = (*ERROR_CLASSES, TOO_MANY_REQUESTS)

# What may pass by itself: a server unreachable for a while, a name server that did not answer
# in time, an overloaded server. A row that failed so is tried again later in the same run
# (Settings.retry_rounds) before its part is final.
TRANSIENT = ("timeout", "connection", "dns", "http_5xx", TOO_MANY_REQUESTS)


def is_transient(error_class: str | None, http_status: int | None, tried: bool,
                 classes: list[str] | tuple[str, ...]) -> bool:
    """Whether a failed fetch deserves another try later: its class is one of `classes`, or
    it was never tried at all (its endpoint had just failed for other rows)."""
    if not tried:
        return True
    if error_class in classes:
        return True
    return http_status == 429 and TOO_MANY_REQUESTS in classes


# Failures a user can fix, with the sentence that says how. A class "dominates" a part's
# failures when it has at least DOMINANT_SHARE of them and at least DOMINANT_ROWS rows.
FIXES = {
    "blocked_address": (
        "these URLs point at private, loopback or link-local addresses, which are refused by "
        "default: --allow-private-addresses (LAION_ALLOW_PRIVATE_ADDRESSES=true) fetches them, "
        "or --allowed-networks CIDR,... only your own networks"),
    "dns": (
        "host names did not resolve: on LAION that is nearly always an overloaded resolver; "
        "run a local caching resolver (unbound, systemd-resolved) and point --dns-servers "
        "(LAION_DNS_SERVERS) at it"),
    "tls": (
        "certificates could not be verified: if these servers use a private CA, give its "
        "certificates with --ca-bundle FILE (LAION_CA_BUNDLE)"),
    "opted_out": (
        "the sites opted these images out with X-Robots-Tag; --opt-out-directives "
        "(LAION_OPT_OUT_DIRECTIVES) lists the directives honoured"),
    "hash_mismatch": (
        "the images differ from the hash column: check that --verify-hash-column "
        "(LAION_VERIFY_HASH_COLUMN) names a column of the images' sha256 hex digests, or "
        "unset it; the column is part of the part's recipe, so start the part over "
        "(`laion-dagster reset PART`) to change it"),
}
DOMINANT_SHARE = 0.5
DOMINANT_ROWS = 5

# The settings that decide the rows of each fixable class at fetch time: when one of them
# differs from what the part was downloaded with, its old failures of that class are not final
# (`run` downloads them again). hash_mismatch is decided by the part's recipe instead.
DECIDED_BY = {
    "blocked_address": ("allow_private_addresses", "allowed_networks"),
    "dns": ("dns_servers",),
    "tls": ("ca_bundle",),
    "opted_out": ("opt_out_directives", "user_agent_token"),
}
FETCH_POLICY = tuple(sorted({name for names in DECIDED_BY.values() for name in names}))


def dominant_fix(classes: dict[str, int]) -> tuple[str, str] | None:
    """(class, what to do) when one fixable class dominates these failures (invalid rows
    apart), else None."""
    failures = {k: v for k, v in classes.items() if k != "invalid_url" and v > 0}
    total = sum(failures.values())
    if not total:
        return None
    name, count = max(failures.items(), key=lambda kv: kv[1])
    if name not in FIXES or count < DOMINANT_ROWS or count < DOMINANT_SHARE * total:
        return None
    return name, FIXES[name]


def fix_sentence(classes: dict[str, int]) -> str | None:
    """`"blocked_address 55 of 55 failures: these URLs ...; then ..."`, or None."""
    found = dominant_fix(classes)
    if found is None:
        return None
    name, fix = found
    total = sum(v for k, v in classes.items() if k != "invalid_url")
    then = (f"; then `laion-dagster run` again fetches those rows again (or `laion-dagster "
            f"errors retry PART --classes {name}`)" if name in DECIDED_BY else "")
    return f"{name} {classes[name]:,} of {total:,} failures: {fix}{then}"
