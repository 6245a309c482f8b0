"""What a failure means: which may pass (and get a later try), and which a setting fixes."""

import pytest
from pydantic import ValidationError

from laion_dagster.core.outcomes import TRANSIENT, fix_sentence, is_transient
from laion_dagster.core.settings import Settings


@pytest.mark.parametrize("error_class,status,tried,expected", [
    ("connection", None, True, True), ("timeout", None, True, True), ("dns", None, True, True),
    ("http_5xx", 503, True, True), ("http_4xx", 429, True, True),
    ("http_4xx", 404, True, False), ("not_image", None, True, False),
    ("blocked_address", None, True, False),
    ("http_4xx", 404, False, True),  # never asked: it says nothing of its server yet
])
def test_which_failures_may_pass(error_class, status, tried, expected):
    assert is_transient(error_class, status, tried, TRANSIENT) is expected


def test_the_retry_classes_are_a_setting_with_checked_names():
    assert not is_transient("dns", None, True, ["connection"])
    assert Settings(retry_classes=["dns", "http_429"]).retry_classes == ["dns", "http_429"]
    with pytest.raises(ValidationError, match="unknown error class dnss"):
        Settings(retry_classes=["dnss"])


def test_a_fixable_class_that_dominates_names_its_setting():
    sentence = fix_sentence({"blocked_address": 55, "invalid_url": 3})
    assert sentence.startswith("blocked_address 55 of 55 failures: these URLs point at "
                               "private, loopback or link-local addresses")
    assert "--allow-private-addresses" in sentence
    assert "then `laion-dagster run` again fetches those rows again" in sentence
    assert "--dns-servers" in fix_sentence({"dns": 600, "http_4xx": 400})
    assert "--ca-bundle" in fix_sentence({"tls": 9})
    assert "reset PART" in fix_sentence({"hash_mismatch": 10, "timeout": 2})


@pytest.mark.parametrize("classes", [
    {"http_4xx": 500, "dns": 100},  # 404s: nothing a setting can do
    {"dns": 400, "http_4xx": 600},  # dns is not the most of them
    {"tls": 4},  # too few to say anything
    {},
    {"invalid_url": 50},  # rows without a URL are not failures of a fetch
])
def test_no_fix_is_offered_where_none_dominates(classes):
    assert fix_sentence(classes) is None
