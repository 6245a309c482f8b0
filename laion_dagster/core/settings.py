"""The one settings model: every knob has a LAION_* environment variable and a default.

Dagster config and CLI flags override the environment through `Settings.with_overrides`, so
all three entry points (UI, CLI, daemon) read the same names. The original LAION Redis
scripts' `setting.py` names are listed in `ORIGINAL_NAMES` and in the README.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

OutputFormat = Literal["files", "webdataset", "parquet"]


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "laion-dagster"


class Settings(BaseSettings):
    """Everything a run, a worker or a sensor needs to know.

    Paths left unset are placed under `data_dir`, so the defaults work out of the box and one
    environment variable moves everything.
    """

    model_config = SettingsConfigDict(env_prefix="LAION_", extra="forbid", validate_default=True)

    # Where things live
    data_dir: Path = Field(default_factory=_default_data_dir)
    parquet_dir: Path | None = None
    store_dir: Path | None = None
    error_dir: Path | None = None

    # Redis: unset means the embedded server under data_dir/redis
    redis_url: str | None = None
    prefix: str = "laion"

    # Reading parts and the queue
    url_column: str | None = None
    caption_column: str | None = None
    # Input columns kept with each sample; unset keeps them all (LAION's metadata is the point).
    save_additional_columns: list[str] | None = None
    shard_size: int = Field(10_000, ge=1)
    queue_threshold: int = Field(5_000_000, ge=1)
    queue_high_watermark: int = Field(6_000_000, ge=1)
    visibility_timeout: float = Field(600.0, gt=0)
    max_deliveries: int = Field(3, ge=1)

    # Workers
    processes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    concurrency: int = Field(64, ge=1)
    per_host_limit: int = Field(8, ge=0)
    shards_in_flight: int = Field(2, ge=1)
    heartbeat_interval: float = Field(5.0, gt=0)
    shutdown_grace: float = Field(30.0, ge=0)
    disk_stop_used_gb: float | None = None
    disk_min_free_gb: float = 5.0
    host_id: str | None = None

    # Fetching
    connect_timeout: float = Field(10.0, gt=0)
    timeout: float = Field(30.0, gt=0)
    max_bytes: int = Field(20_000_000, ge=1)
    max_redirects: int = Field(5, ge=0)
    retries: int = Field(1, ge=0)
    user_agent: str = "laion-dagster/0.1 (+https://github.com/laion-dagster/laion-dagster)"
    # The token site owners address in `X-Robots-Tag: laion-dagster: noai`.
    user_agent_token: str = "laion-dagster"
    opt_out_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    max_retry_after: float = Field(10.0, ge=0)
    allow_private_addresses: bool = False
    # Non-public networks (CIDRs) fetched anyway, e.g. ["127.0.0.1/32"] for a loopback test
    # server; narrower than allow_private_addresses, so the guard stays on for everything else.
    allowed_networks: list[str] = Field(default_factory=list)
    host_map: dict[str, str] = Field(default_factory=dict)

    # Image checks
    min_image_size: int = Field(0, ge=0)
    max_image_area: int | None = Field(None, ge=1)
    max_aspect_ratio: float | None = Field(None, ge=1)
    verify_hash_column: str | None = None  # an input column holding each image's sha256

    # Resizing (img2dataset's modes); "no" stores the original bytes untouched
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "no"
    image_size: int = Field(256, ge=1)
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)

    # Output and checks
    output_format: OutputFormat = "webdataset"
    # Re-download shards that are already complete on disk (default: report them from disk).
    overwrite: bool = False
    min_success_rate: float = Field(0.5, ge=0, le=1)

    @field_validator("data_dir", "parquet_dir", "store_dir", "error_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Dagster runs and workers start in other working directories; relative paths would
        # silently point somewhere else there.
        return None if value is None else value.expanduser().absolute()

    @field_validator("allowed_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        # A typo here would silently leave the guard wider or narrower than meant: refuse it.
        try:
            return [str(ipaddress.ip_network(cidr.strip())) for cidr in value]
        except ValueError as error:
            raise ValueError(
                f"allowed_networks: not a network in CIDR notation ({error})") from None

    @property
    def parts_root(self) -> Path:
        return self.parquet_dir or self.data_dir / "parquet"

    @property
    def store_root(self) -> Path:
        return self.store_dir or self.data_dir / "store"

    @property
    def errors_root(self) -> Path:
        return self.error_dir or self.store_root / "_errors"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given fields replaced; None means 'keep what the environment says'."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - set(type(self).model_fields)
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        return type(self).model_validate({**self.model_dump(), **given})

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child process (worker, Dagster run) see these settings."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            key = f"LAION_{name.upper()}"
            if isinstance(value, dict | list):
                env[key] = json.dumps(value)
            elif isinstance(value, bool):
                env[key] = "true" if value else "false"
            else:
                env[key] = str(value)
        return env


# The original LAION-5B scripts' setting.py names and what replaced them.
ORIGINAL_NAMES: dict[str, str] = {
    "redis_ip": "redis_url (host part)",
    "redis_port": "redis_url (port part)",
    "redis_db": "redis_url (path part, /N)",
    "redis_pass": "redis_url (password part)",
    "task_key": "prefix (stream <prefix>:tasks)",
    "parquet_dir": "parquet_dir",
    "addtask_threshold": "queue_threshold",
    "done_path": "part:<partition> hash in Redis + shard _stats.json files",
    "monitor_disk": "store_dir (the disk each worker watches)",
    "store_dir": "store_dir",
    "stop_threshold": "disk_stop_used_gb",
    "thread_num": "concurrency",
    "store_error_dir": "error_dir",
}
