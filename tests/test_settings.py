"""One settings model: environment, overrides, children, and the original scripts' names."""

from pathlib import Path

import pytest

from laion_dagster.core.settings import ORIGINAL_NAMES, Settings
from laion_dagster.defs.resources import LaionResource

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_work_without_any_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    s = Settings()
    assert s.redis_url is None  # the embedded server
    assert s.data_dir == tmp_path / ".local/share/laion-dagster"
    assert s.parts_root == s.data_dir / "parquet"
    assert s.store_root == s.data_dir / "store"
    assert s.errors_root == s.store_root / "_errors"
    assert s.queue_threshold == 5_000_000  # addtask_threshold of the original scripts


def test_environment_and_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("LAION_STORE_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("LAION_CONCURRENCY", "7")
    monkeypatch.setenv("LAION_HOST_MAP", '{"a.test": "127.0.0.2"}')
    s = Settings()
    assert s.store_root == tmp_path / "s" and s.concurrency == 7
    assert s.host_map == {"a.test": "127.0.0.2"}
    t = s.with_overrides(concurrency=3, store_dir=None)
    assert t.concurrency == 3 and t.store_root == tmp_path / "s"
    with pytest.raises(ValueError, match="unknown settings: nope"):
        s.with_overrides(nope=1)


def test_children_see_the_same_settings(monkeypatch, tmp_path):
    s = Settings(data_dir=tmp_path, concurrency=9, allow_private_addresses=True,
                 host_map={"x.test": "127.0.0.1"}, disk_stop_used_gb=12.5)
    for key, value in s.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == s


def test_dagster_resource_fields_are_settings():
    assert set(LaionResource.model_fields) <= set(Settings.model_fields)
    resource = LaionResource(shard_size=7, prefix="p")
    assert resource.settings().shard_size == 7 and resource.settings().prefix == "p"


def test_readme_maps_every_original_setting():
    text = README.read_text()
    for original, ours in ORIGINAL_NAMES.items():
        assert f"`{original}`" in text, f"README does not mention {original}"
        assert ours.split(" ")[0] in text


def test_the_packaged_dagster_yaml_is_the_repos():
    """`run`/`up` copy the packaged file into a new DAGSTER_HOME; it must not drift."""
    root = README.parent
    packaged = root / "laion_dagster" / "dagster.yaml"
    assert packaged.read_text() == (root / "dagster.yaml").read_text()
    assert "enabled: false" in packaged.read_text()  # telemetry off: nothing phones home
