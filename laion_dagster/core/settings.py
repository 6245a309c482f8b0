"""The one settings model: every knob has a LAION_* environment variable and a default.

Dagster config and CLI flags override the environment through `Settings.with_overrides`, so
all three entry points (UI, CLI, daemon) read the same names. The original LAION Redis
scripts' `setting.py` names are listed in `ORIGINAL_NAMES` and in the README.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
import types
import typing
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from laion_dagster.core import storage
from laion_dagster.core.outcomes import RETRY_CLASS_NAMES, TRANSIENT

OutputFormat = Literal["files", "webdataset", "parquet"]


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "laion-dagster"


STATE_FOLDER = ".laion-dagster"


class Settings(BaseSettings):
    """Everything a run, a worker or a sensor needs to know.

    Paths left unset have defaults that work out of the box. The state of a download (the
    embedded Redis, the Dagster instance, logs) lives with the data it describes: in `data_dir`
    when one is named, else beside the store (`<store_dir>/.laion-dagster`), so two unrelated
    downloads on one machine never share a queue or an instance by accident.
    """

    model_config = SettingsConfigDict(env_prefix="LAION_", extra="forbid", validate_default=True)

    # Where things live
    data_dir: Path | None = Field(None, description=(
        "home of the embedded Redis, the Dagster instance and the logs, and of parquet/ and "
        "store/ when those are unset (default: <store_dir>/.laion-dagster when store_dir is "
        "set, else ~/.local/share/laion-dagster)"))
    # A folder, or a bucket URL (s3://bucket/prefix, gs://...), kept as a str (see storage.py).
    parquet_dir: Path | str | None = Field(None, description=(
        "the input parts: one file, a folder of files (its name is the subset) or a folder "
        "of subset folders, on disk or in a bucket (s3://bucket/prefix); parquet, csv, tsv, "
        "txt (a URL a line), json or jsonl, those but parquet also .gz (default: "
        "<data_dir>/parquet, or what the store's last run read)"))
    store_dir: Path | str | None = Field(None, description=(
        "where shards are written: a folder, or a bucket (s3://bucket/prefix, gs://...) "
        "(default: <data_dir>/store)"))
    error_dir: Path | str | None = Field(None, description=(
        "where each part's error file goes, a folder or a bucket (<store_dir>/_errors)"))
    spool_dir: Path | None = Field(None, description=(
        "local folder where a worker builds each shard before uploading it, when the store "
        "is a bucket; its disk is the one the disk checks watch (<state>/spool)"))

    # Object storage: unset, these come from where the AWS SDKs read them (AWS_ENDPOINT_URL,
    # AWS_REGION, AWS_PROFILE; credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or
    # the profile, never from a setting, so they stay out of Dagster's run config).
    s3_endpoint_url: str | None = Field(None, description=(
        "S3 API endpoint of a MinIO, Ceph, R2 or other server, e.g. http://10.0.0.5:9000 "
        "(default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS)"))
    s3_region: str | None = Field(None, description=(
        "bucket region (default: AWS_REGION or AWS_DEFAULT_REGION, else us-east-1)"))
    s3_profile: str | None = Field(None, description=(
        "profile in ~/.aws/config and ~/.aws/credentials (default: AWS_PROFILE)"))
    s3_virtual_addressing: bool = Field(False, description=(
        "address buckets as <bucket>.<endpoint> even with s3_endpoint_url set (default: "
        "path-style there, which MinIO and Ceph expect)"))

    # Redis: unset means the embedded server under <state>/redis
    redis_url: str | None = Field(None, description=(
        "redis:// or rediss:// URL with password and /db; unset starts the embedded server"))
    prefix: str = Field("laion", description="prefix of every Redis key (the old task_key)")

    # Reading parts and the queue
    url_column: str | None = Field(None, description=(
        "input column holding URLs (default: URL/url, matched case-insensitively)"))
    caption_column: str | None = Field(None, description=(
        "input column holding captions (default: TEXT/caption)"))
    save_additional_columns: list[str] | None = Field(None, description=(
        "input columns kept with each sample; unset keeps them all (LAION's metadata is the "
        "point)"))
    key_columns: list[str] | None = Field(None, description=(
        "input columns that identify a row, copied into the part's error file (default: "
        "those of SAMPLE_ID, hash, uid, id the part has)"))
    shard_size: int | None = Field(None, ge=1, description=(
        "rows per shard (one queue entry); unset: from the part's rows and the pool, so every "
        "process gets several shards of a small part (at most 10,000, at least 250)"))
    queue_threshold: int = Field(5_000_000, ge=1, description=(
        "the sensor launches a part only while fewer rows than this are queued"))
    queue_high_watermark: int = Field(6_000_000, ge=1, description=(
        "an enqueue waits while more rows than this are queued (bounds Redis memory)"))
    visibility_timeout: float = Field(600.0, gt=0, description=(
        "seconds without a sign of life after which another worker takes over a shard"))
    max_deliveries: int = Field(3, ge=1, description=(
        "deliveries after which a shard that never completes goes to the dead-letter stream"))

    # Workers
    processes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, description=(
        "worker processes per host (default: one per core)"))
    concurrency: int = Field(256, ge=1, description=(
        "concurrent fetches per worker process (the old thread_num); on the web a fetch "
        "mostly waits (DNS, handshakes, slow servers), so many in flight keep a core busy"))
    idle_connections: int = Field(128, ge=0, description=(
        "idle keep-alive connections a worker process keeps, the least recently used closed "
        "first: each holds some memory and spares a TLS handshake when its server is asked "
        "again; LAION's servers are many, so an unbounded pool grows without end"))
    per_host_limit: int = Field(8, ge=0, description=(
        "concurrent connections per web server (host name) per process; 0 means no limit"))
    shards_in_flight: int = Field(32, ge=1, description=(
        "shards a process works on at once: while some wait on their slowest URL, it "
        "fetches from the others"))
    heartbeat_interval: float = Field(5.0, gt=0, description=(
        "seconds between a worker host's reports (disk, rate, state)"))
    shutdown_grace: float = Field(30.0, ge=0, description=(
        "seconds a stopping worker may finish its shards before handing them back"))
    disk_stop_used_gb: float | None = Field(None, description=(
        "pause a host whose store disk has this many GB used (the old stop_threshold)"))
    disk_min_free_gb: float = Field(5.0, description=(
        "pause a host whose store disk has fewer GB free than this"))
    host_id: str | None = Field(None, description="this worker host's name (default: hostname)")

    observe_interval: int = Field(30, ge=5, description=(
        "seconds between the Dagster UI's reports of the downloading parts, the worker hosts "
        "and the queue (the watch_downloads sensor's interval, and `run`'s)"))
    stall_timeout: float = Field(300.0, ge=0, description=(
        "`run` ends (exit 1, saying why) when nothing was downloaded, failed or queued for "
        "this many seconds while work remains; 0 waits forever"))

    # Fetching
    connect_timeout: float = Field(10.0, gt=0, description="seconds to connect (DNS included)")
    timeout: float = Field(30.0, gt=0, description=(
        "total seconds per URL, redirects and body included; a trickling server cannot hold a "
        "slot longer"))
    read_timeout: float = Field(10.0, gt=0, description=(
        "seconds a server may stay silent once asked (before its answer, or mid-body); one "
        "that never answers frees its fetch slot after this, not after `timeout`"))
    max_bytes: int = Field(20_000_000, ge=1, description=(
        "largest body accepted; enforced while streaming (class too_large)"))
    max_redirects: int = Field(5, ge=0, description="redirects followed per URL")
    retries: int = Field(1, ge=0, description=(
        "retries of a connection error, 429 or 5xx, with backoff and jitter, within the "
        "deadline; a timeout is not asked again at once (retry_rounds asks it later)"))
    retry_rounds: int = Field(1, ge=0, description=(
        "later tries of a row whose fetch failed in a way that may pass (retry_classes), or "
        "that was not tried because its host had just failed to connect: each comes "
        "retry_delay seconds after the try before it began, before the row's shard is "
        "written; 0 turns them off"))
    retry_delay: float = Field(20.0, ge=0, description=(
        "seconds from the start of a row's failed try to its next one: long enough for a "
        "host that drops connections for a few seconds to come back"))
    retry_classes: list[str] = Field(
        default_factory=lambda: list(TRANSIENT), description=(
            "error classes tried again later in the same run (http_429: a 429 answer)"))
    user_agent: str = Field(
        "laion-dagster/0.2 (+https://github.com/laion-dagster/laion-dagster)",
        description="User-Agent header; name your project and a contact URL")
    user_agent_token: str = Field("laion-dagster", description=(
        "the token site owners address in 'X-Robots-Tag: <token>: noai'"))
    opt_out_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that opt an image out (class opted_out)")
    max_retry_after: float = Field(10.0, ge=0, description=(
        "longest Retry-After honoured on a 429 or 503; longer ones fail the row"))
    allow_private_addresses: bool = Field(False, description=(
        "fetch private, loopback and link-local addresses too (your own test server, a NAS, "
        "an intranet); refused by default, as the web's URLs are hostile"))
    allowed_networks: list[str] = Field(default_factory=list, description=(
        "non-public networks (CIDR) fetched anyway, e.g. 127.0.0.1/32 for a local test "
        "server; narrower than allow_private_addresses"))
    host_map: dict[str, str] = Field(default_factory=dict, description=(
        "host name -> IP address answered without DNS (tests and the demo)"))
    ca_bundle: Path | None = Field(None, description=(
        "PEM file of the certificate authorities to trust (a private CA); unset: the "
        "system's (or SSL_CERT_FILE)"))
    dns_servers: list[str] | None = Field(None, description=(
        "name servers to ask (address or address:port), e.g. a local caching resolver; "
        "unset: the system's (/etc/resolv.conf)"))

    # Image checks
    min_image_size: int = Field(0, ge=0, description=(
        "smallest width and height kept (class filtered)"))
    max_image_area: int | None = Field(None, ge=1, description=(
        "largest width x height kept (class filtered)"))
    max_aspect_ratio: float | None = Field(None, ge=1, description=(
        "largest long side / short side kept (class filtered)"))
    verify_hash_column: str | None = Field(None, description=(
        "input column holding each image's sha256 (class hash_mismatch)"))

    # Resizing (img2dataset's modes); "no" stores the original bytes untouched
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = \
        Field("no", description="img2dataset's resize modes; no keeps the original bytes")
    image_size: int = Field(256, ge=1, description="target size of the resize, in pixels")
    resize_only_if_bigger: bool = Field(False, description="never upscale")
    encode_format: Literal["jpg", "png", "webp"] = Field("jpg", description=(
        "format of resized images"))
    encode_quality: int = Field(95, ge=1, le=100, description="jpg/webp quality of resized images")

    # Output and checks
    output_format: OutputFormat = Field("webdataset", description=(
        "webdataset (tar), files (folders) or parquet (image bytes in a column)"))
    overwrite: bool = Field(False, description=(
        "download shards that are already complete on disk again (default: keep them)"))
    min_success_rate: float = Field(0.5, ge=0, le=1, description=(
        "the part_images check warns below this success rate"))

    @field_validator("retry_classes")
    @classmethod
    def _retry_classes(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(RETRY_CLASS_NAMES))
        if unknown:
            raise ValueError(f"unknown error class {', '.join(unknown)}; the classes are "
                             f"{', '.join(RETRY_CLASS_NAMES)}")
        return value

    @field_validator("data_dir", "spool_dir", mode="before")
    @classmethod
    def _local_only(cls, value: object) -> object:
        # Path("s3://bucket/x") is the local folder "s3:/bucket/x": state and spool space
        # must be on a local disk, and a URL must never quietly become a folder named s3:.
        if storage.is_url(value):
            raise ValueError(f"{value} is a URL; this must be a local folder (the embedded "
                             "Redis, the Dagster instance and the spool live there)")
        return value

    @field_validator("parquet_dir", "store_dir", "error_dir", mode="before")
    @classmethod
    def _folder_or_bucket(cls, value: object) -> object:
        # A bucket stays a normalized URL string (refused here if we cannot write its scheme,
        # before anything starts); anything else is a local path.
        if isinstance(value, storage.BucketPath):
            value = str(value)
        if storage.is_url(value):
            return storage.check_url(value)
        if isinstance(value, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", value):
            # "s3:/bucket/x" (one slash) would otherwise be the local folder "s3:".
            raise ValueError(f"{value} looks like a URL with a slash missing (s3://bucket/...)")
        return None if value is None else Path(value)

    @field_validator("data_dir", "parquet_dir", "store_dir", "error_dir", "spool_dir",
                     "ca_bundle")
    @classmethod
    def _absolute(cls, value: Path | str | None) -> Path | str | None:
        # Dagster runs and workers start in other working directories; relative paths would
        # silently point somewhere else there.
        if value is None or isinstance(value, str):
            return value
        return value.expanduser().absolute()

    @field_validator("ca_bundle")
    @classmethod
    def _readable_certificates(cls, value: Path | None) -> Path | None:
        # Every worker process builds its SSL context from it: a wrong path would kill each
        # one as it starts, and a run would sit still until its stall timeout.
        if value is None:
            return None
        try:
            ssl.create_default_context(cafile=str(value))
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"not a readable PEM file of certificates ({error})") from None
        return value

    @field_validator("allowed_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        # A typo here would silently leave the guard wider or narrower than meant: refuse it.
        try:
            return [str(ipaddress.ip_network(cidr.strip())) for cidr in value]
        except ValueError as error:
            raise ValueError(
                f"allowed_networks: not a network in CIDR notation ({error})") from None

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # redis-py's own error for a malformed URL is a traceback from deep inside a client.
        if value is None or not value.strip():
            return None
        split = urlsplit(value.strip())
        if split.scheme == "unix" and split.path:
            return value.strip()
        if split.scheme not in ("redis", "rediss") or not split.hostname:
            raise ValueError("expected redis://[:password@]host[:port][/db], rediss://... for "
                             "TLS, or unix:///path/to/socket")
        try:
            split.port  # noqa: B018 - raises for a port that is not a number
        except ValueError as error:
            raise ValueError(f"bad port ({error})") from None
        return value.strip()

    @property
    def home(self) -> Path:
        """The data folder: named, or the user's default."""
        return self.data_dir or _default_data_dir()

    @property
    def object_store(self) -> storage.ObjectStore:
        return storage.ObjectStore(self.s3_endpoint_url, self.s3_region, self.s3_profile,
                                   self.s3_virtual_addressing)

    @property
    def parts_root(self) -> storage.Where:
        return storage.location(self.parquet_dir or self.home / "parquet", self.object_store)

    @property
    def store_root(self) -> storage.Where:
        return storage.location(self.store_dir or self.home / "store", self.object_store)

    @property
    def errors_root(self) -> storage.Where:
        if self.error_dir is not None:
            return storage.location(self.error_dir, self.object_store)
        return self.store_root / "_errors"

    @property
    def in_bucket(self) -> bool:
        """Whether shards go to object storage (built in `spool_root`, then uploaded)."""
        return storage.is_bucket(self.store_root)

    @property
    def spool_root(self) -> Path:
        return self.spool_dir or self.state_dir / "spool"

    @property
    def disk_root(self) -> Path:
        """The local disk a worker host fills, and so watches: the store's, or the spool's
        when the store is a bucket (whose size is the provider's business)."""
        return self.spool_root if self.in_bucket else self.store_root

    @property
    def state_dir(self) -> Path:
        """Where the embedded Redis, the Dagster instance and the logs of this download live:
        the named data folder, else beside the store it describes (for a bucket, a local
        folder named after it)."""
        if self.data_dir is not None:
            return self.data_dir
        if isinstance(self.store_dir, Path):
            return self.store_dir / STATE_FOLDER
        if self.store_dir is not None:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.store_dir.split("://", 1)[1])
            return self.home / "buckets" / f"{self.store_dir.split(':', 1)[0]}_{name}"
        return self.home

    @property
    def redis_dir(self) -> Path:
        return self.state_dir / "redis"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def inputs_record(self) -> Path:
        return self.state_dir / "inputs.json"

    def remember_inputs(self) -> None:
        """Keep the input path in the state folder: a later command that names only the store
        (`status`, `errors retry`) reads the parts from where this download read them."""
        self.inputs_record.parent.mkdir(parents=True, exist_ok=True)
        self.inputs_record.write_text(json.dumps({"parquet_dir": str(self.parts_root)}) + "\n")

    def with_remembered_inputs(self) -> Settings:
        """A copy whose unset parquet_dir is the one this state folder's download used."""
        if self.parquet_dir is not None:
            return self
        try:
            remembered = json.loads(self.inputs_record.read_text())["parquet_dir"]
        except (OSError, ValueError, KeyError, TypeError):
            return self
        return self.model_copy(update={"parquet_dir": self._folder_or_bucket(remembered)})

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


def setting_kind(name: str) -> Any:
    """A setting's type without its `| None`: what a CLI flag or a config field must accept."""
    kind = Settings.model_fields[name].annotation
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    return kind


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
    "monitor_disk": "store_dir (the disk each worker watches; a bucket store's spool_dir)",
    "store_dir": "store_dir",
    "stop_threshold": "disk_stop_used_gb",
    "thread_num": "concurrency",
    "store_error_dir": "error_dir",
}
