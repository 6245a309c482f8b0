"""One settings model: environment, overrides, children, and the original scripts' names."""

import os
from pathlib import Path

import pytest

from laion_dagster.cli import _settings, build_parser
from laion_dagster.core.settings import ORIGINAL_NAMES, Settings
from laion_dagster.defs.resources import LaionResource

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_work_without_any_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    s = Settings()
    assert s.redis_url is None  # the embedded server
    home = tmp_path / ".local/share/laion-dagster"
    assert s.parts_root == home / "parquet"
    assert s.store_root == home / "store"
    assert s.errors_root == s.store_root / "_errors"
    assert s.state_dir == home and s.redis_dir == home / "redis"
    assert s.queue_threshold == 5_000_000  # addtask_threshold of the original scripts


def test_state_lives_with_the_data_it_describes(monkeypatch, tmp_path):
    """The embedded Redis, the Dagster instance and the logs of a download live in the data
    folder it names, else beside its store: two downloads into two stores share nothing."""
    monkeypatch.setenv("HOME", str(tmp_path))
    a = Settings(store_dir=tmp_path / "a")
    b = Settings(store_dir=tmp_path / "b")
    assert a.state_dir == tmp_path / "a" / ".laion-dagster" != b.state_dir
    assert a.redis_dir == a.state_dir / "redis" and a.log_dir == a.state_dir / "logs"
    named = Settings(data_dir=tmp_path / "d", store_dir=tmp_path / "a")
    assert named.state_dir == tmp_path / "d" and named.store_root == tmp_path / "a"


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


def test_every_setting_is_dagster_config_and_a_flag_of_run_and_worker():
    assert set(LaionResource.model_fields) == set(Settings.model_fields)
    parser = build_parser()
    for command in ("run", "worker", "up", "demo"):
        sub = parser._subparsers._group_actions[0].choices[command]
        flags = {action.dest for action in sub._actions}
        assert set(Settings.model_fields) <= flags, set(Settings.model_fields) - flags


def test_dagster_config_reaches_the_settings_with_every_kind_of_value():
    resource = LaionResource(shard_size=7, prefix="p", resize_mode="border",
                             host_map={"a.test": "127.0.0.2"}, opt_out_directives=["noai"],
                             overwrite=True, store_dir="/tmp/x")
    s = resource.settings()
    assert (s.shard_size, s.prefix, s.resize_mode, s.overwrite) == (7, "p", "border", True)
    assert s.host_map == {"a.test": "127.0.0.2"} and s.opt_out_directives == ["noai"]
    assert s.store_root == Path("/tmp/x")
    with pytest.raises(ValueError, match="resize_mode"):
        LaionResource(resize_mode="squash").settings()


def test_worker_flags_parse_into_the_settings(monkeypatch):
    for key in [k for k in os.environ if k.startswith("LAION_")]:
        monkeypatch.delenv(key)
    args = build_parser().parse_args([
        "worker", "--resize-mode", "center_crop", "--image-size", "64",
        "--host-map", "a.test=127.0.0.1, b.test=127.0.0.2", "--opt-out-directives", "noai,noindex",
        "--allow-private-addresses", "--overwrite", "--max-aspect-ratio", "2.5",
        "--save-additional-columns", "similarity,LICENSE", "--host-id", "gpu-07"])
    s = _settings(args)
    assert (s.resize_mode, s.image_size, s.overwrite, s.max_aspect_ratio) == \
        ("center_crop", 64, True, 2.5)
    assert s.host_map == {"a.test": "127.0.0.1", "b.test": "127.0.0.2"}
    assert s.opt_out_directives == ["noai", "noindex"] and s.allow_private_addresses
    assert s.save_additional_columns == ["similarity", "LICENSE"] and s.host_id == "gpu-07"
    # Unset flags keep the environment's value.
    monkeypatch.setenv("LAION_CONCURRENCY", "9")
    assert _settings(build_parser().parse_args(["worker"])).concurrency == 9
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--encode-format", "gif"])


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
