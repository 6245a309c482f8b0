"""`laion-dagster`: run, demo, up, worker, status, errors export|retry, reset, discover.

Flags override LAION_* environment variables, which override the defaults; all three are the
one settings model (`core/settings.py`).
"""

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Iterable
from pathlib import Path

from laion_dagster.core import embedded
from laion_dagster.core.connection import RedisUnavailable, connect
from laion_dagster.core.embedded import EmbeddedServerError
from laion_dagster.core.settings import Settings, setting_kind

DEMO_HOSTS = ("img-a.test", "img-b.test", "img-c.test")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name, None) for name in Settings.model_fields}
    return Settings().with_overrides(**overrides)


# Flags of the commands that only look at the queue and the files, not at downloading.
WHERE = ("data_dir", "parquet_dir", "store_dir", "error_dir", "redis_url", "prefix",
         "url_column", "caption_column", "save_additional_columns", "shard_size")


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _host_map(text: str) -> dict[str, str]:
    """'name=ip,name2=ip2' (or a JSON object)."""
    if text.lstrip().startswith("{"):
        return json.loads(text)
    pairs = [item.split("=", 1) for item in _comma_list(text)]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError("expected name=address[,name=address...]")
    return {name.strip(): address.strip() for name, address in pairs}


def _settings_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """One flag per setting, made from the settings model so the two can never drift apart."""
    group = parser.add_argument_group("settings (each also LAION_<NAME>; flags win)")
    for name in names or Settings.model_fields:
        field = Settings.model_fields[name]
        kind = setting_kind(name)
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default_factory is None else None
        shown = f" (default: {default})" if default not in (None, [], {}) else ""
        options: dict = {"dest": name, "default": None, "help": (field.description or "") + shown}
        if typing.get_origin(kind) is typing.Literal:
            options["choices"] = typing.get_args(kind)
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            options.update(type=_comma_list, metavar="A,B,...")
        elif typing.get_origin(kind) is dict:
            options.update(type=_host_map, metavar="NAME=ADDRESS,...")
        elif kind in (int, float, Path):
            options["type"] = kind
        group.add_argument(flag, **options)


def _common(parser: argparse.ArgumentParser, pool: bool = True) -> None:
    _settings_flags(parser, None if pool else WHERE)


def cmd_worker(args: argparse.Namespace) -> int:
    from laion_dagster.worker.supervisor import Supervisor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s "
                                                   "%(message)s")
    return Supervisor(_settings(args)).run()


def cmd_run(args: argparse.Namespace) -> int:
    from laion_dagster.oneshot import OneShot, format_summary

    settings = _settings(args)
    result = OneShot(settings).run()
    print(format_summary(result, settings))
    return 0 if result.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from laion_dagster.demo.dataset import make_images, write_dataset
    from laion_dagster.demo.server import ImageServer
    from laion_dagster.oneshot import OneShot, format_summary

    base = _settings(args)
    demo_dir = (args.data_dir or base.data_dir / "demo").absolute()
    embedded.stop(demo_dir / "redis")
    shutil.rmtree(demo_dir, ignore_errors=True)
    # The demo is self-contained: its own Redis, store and Dagster instance, whatever the
    # environment says, and only loopback traffic to the image server it starts.
    settings = base.model_copy(update={
        "data_dir": demo_dir, "parquet_dir": demo_dir / "parquet", "store_dir": demo_dir / "store",
        "error_dir": None, "redis_url": None, "prefix": "laion-demo",
        "shard_size": args.shard_size or 250, "processes": args.processes or 2,
        "concurrency": args.concurrency or 32, "allow_private_addresses": True,
        "host_map": {host: "127.0.0.1" for host in DEMO_HOSTS}, "timeout": 10.0,
        "heartbeat_interval": 2.0,
    })
    os.environ["DAGSTER_HOME"] = str(demo_dir / "dagster")
    print(f"generating a LAION-like demo dataset in {demo_dir} ...", flush=True)
    images = make_images(200)
    with ImageServer({image.path: image for image in images}) as server:
        dataset = write_dataset(settings.parts_root, [server.url(h) for h in DEMO_HOSTS],
                                rows_per_part=args.rows_per_part, images=images)
        print(f"{len(dataset.parts)} parts, {len(dataset.expected_by_row):,} rows, served from "
              f"{server.url()} as {', '.join(DEMO_HOSTS)}", flush=True)
        result = OneShot(settings).run()
    print(format_summary(result, settings))
    print(f"\nsee it in the UI: LAION_DATA_DIR={demo_dir} DAGSTER_HOME={demo_dir}/dagster "
          "dagster dev -m laion_dagster.definitions")
    return 0 if result.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from laion_dagster.core.queue import Queue
    from laion_dagster.core.status import collect, render

    settings = _settings(args)
    client = connect(settings, name="laion-dagster-status", retries=2)
    queue = Queue(client, settings.prefix)
    while True:
        status = collect(queue, settings)
        text = json.dumps(status.to_dict(), indent=2) if args.json else render(status)
        if args.watch:
            print("\033[2J\033[H" + time.strftime("%H:%M:%S  ") + text, flush=True)
            time.sleep(args.watch)
        else:
            print(text)
            return 0


def cmd_errors_export(args: argparse.Namespace) -> int:
    from laion_dagster.core.accounting import export_errors
    from laion_dagster.core.queue import Queue

    settings = _settings(args)
    client = connect(settings, name="laion-dagster-errors", retries=2)
    queue = Queue(client, settings.prefix)
    known = queue.partitions()
    if args.part not in known:
        print(f"laion-dagster: unknown part {args.part!r}; known parts: "
              f"{', '.join(known[:10]) or 'none'}", file=sys.stderr)
        return 2
    out = (args.out or Path.cwd()).absolute()
    try:
        parquet_path, jsonl_path, count = export_errors(queue, args.part, settings, out,
                                                        progress=_progress_bar("export"))
    except FileNotFoundError as error:
        print(f"laion-dagster: {error}", file=sys.stderr)
        return 2
    print(f"{count:,} failed rows of {args.part}: {parquet_path} and {jsonl_path}")
    return 0


def _progress_bar(label: str, width: int = 30):
    """A progress callback that redraws one line on a terminal and stays silent in logs."""
    if not sys.stderr.isatty():
        return None

    from laion_dagster.core.status import bar

    def show(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{label} {bar(done, max(total, 1), width)} {done:,}/{total:,}", end=end,
              file=sys.stderr, flush=True)

    return show


def cmd_errors_retry(args: argparse.Namespace) -> int:
    from laion_dagster.core import parts
    from laion_dagster.core.queue import Queue
    from laion_dagster.core.retry import RetryRefused, retry_failed

    settings = _settings(args)
    client = connect(settings, name="laion-dagster-errors", retries=2)
    queue = Queue(client, settings.prefix, settings.visibility_timeout, settings.max_deliveries)
    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    try:
        part = parts.find(settings.parts_root, args.part)
        report = retry_failed(queue, part, settings, classes)
    except (parts.PartError, RetryRefused, FileNotFoundError) as error:
        print(f"laion-dagster: {error}", file=sys.stderr)
        return 2
    if not report.rows:
        print(f"no failed rows of {', '.join(classes)} in {args.part}; nothing to retry")
        return 0
    by_class = ", ".join(f"{k} {v:,}" for k, v in sorted(report.classes.items()))
    print(f"retry round {report.round}: {report.rows:,} rows ({by_class}) queued again in "
          f"{report.shards} shards; running workers pick them up, and the part is finalized "
          "again when they are done")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    from laion_dagster.core.queue import Queue

    settings = _settings(args)
    client = connect(settings, name="laion-dagster-reset", retries=2)
    queue = Queue(client, settings.prefix, settings.visibility_timeout, settings.max_deliveries)
    if args.part not in queue.partitions():
        print(f"laion-dagster: {args.part} was never enqueued; nothing to reset", file=sys.stderr)
        return 2
    generation = queue.reset(args.part)
    print(f"{args.part}: generation {generation}; its queued shards and counts are dropped. "
          "Enqueue it again (the launch_or_hold sensor does, or `run`, or the UI) to download "
          "it with the current settings; shards already complete on disk are kept unless "
          "overwrite is set")
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from laion_dagster.core import parts
    from laion_dagster.defs.partitions import PARTS
    from laion_dagster.instance import get_instance

    settings = _settings(args)
    instance = get_instance(settings)
    found = [p.key for p in parts.discover(settings.parts_root)]
    known = set(instance.get_dynamic_partitions(PARTS))
    new = [k for k in found if k not in known]
    if new:
        instance.add_dynamic_partitions(PARTS, new)
    for key in found:
        print(("added  " if key in new else "known  ") + key)
    print(f"{len(new)} new, {len(found)} parts under {settings.parts_root}")
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _stop_children(children: list[subprocess.Popen], grace: float) -> None:
    """Ctrl-C first (graceful for dagster dev and workers), then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        alive = [child for child in children if child.poll() is None]
        if not alive:
            return
        for child in alive:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(c.poll() is None for c in alive):
            time.sleep(0.2)


def cmd_up(args: argparse.Namespace) -> int:
    from laion_dagster.instance import ensure_dagster_home

    settings = _settings(args)
    home = ensure_dagster_home(settings)
    os.environ.update(settings.to_env())
    state = embedded.read_state(settings.redis_dir)
    started_redis = not settings.redis_url and not (state and embedded.is_alive(state))
    connect(settings).close()  # starts the embedded server if needed, fails early if not
    dagster = Path(sys.executable).with_name("dagster")
    children = [
        subprocess.Popen([sys.executable, "-m", "laion_dagster.cli", "worker"]),
        subprocess.Popen([str(dagster) if dagster.exists() else "dagster", "dev", "-m",
                          "laion_dagster.definitions", "-p", str(args.port)]),
    ]
    print(f"Dagster UI on http://127.0.0.1:{args.port} (DAGSTER_HOME={home}); "
          f"workers writing to {settings.store_root}. Ctrl-C stops everything.", flush=True)
    # SIGTERM (systemd, kill) means the same as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping: workers finish their shards, dagster dev shuts down ...", flush=True)
    finally:
        _stop_children(children, settings.shutdown_grace + 30)
        if started_redis:
            embedded.stop(settings.redis_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="laion-dagster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="download every part of a folder, then exit")
    _common(run)
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", help="run on a generated dataset served from loopback")
    _common(demo)
    demo.add_argument("--rows-per-part", dest="rows_per_part", type=int, default=1000)
    demo.set_defaults(func=cmd_demo)
    up = sub.add_parser("up", help="embedded Redis + dagster dev + a local worker pool")
    _common(up)
    up.add_argument("--port", type=int, default=3000)
    up.set_defaults(func=cmd_up)
    worker = sub.add_parser("worker", help="a worker pool on this host (downloader.py)")
    _common(worker)
    worker.set_defaults(func=cmd_worker)
    status = sub.add_parser("status", help="queue, rates, ETA, parts and hosts (speed.py)")
    _common(status, pool=False)
    status.add_argument("--watch", type=float, nargs="?", const=2.0)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    errors = sub.add_parser("errors", help="a part's failed rows (save_error_task.py)")
    errors_sub = errors.add_subparsers(dest="errors_command", required=True)
    export = errors_sub.add_parser("export", help="write a part's failed rows to files")
    _common(export, pool=False)
    export.add_argument("part", help="the partition key, <subset>__<part>")
    export.add_argument("--out", type=Path, help="folder for the files (default: here)")
    export.set_defaults(func=cmd_errors_export)
    retry = errors_sub.add_parser("retry", help="queue a part's failed rows again")
    _common(retry, pool=False)
    retry.add_argument("part", help="the partition key, <subset>__<part>")
    retry.add_argument("--classes", default="timeout,connection,dns,http_5xx",
                       help="error classes to retry, comma-separated (default: %(default)s)")
    retry.set_defaults(func=cmd_errors_retry)
    reset = sub.add_parser("reset", help="start a part over as a new generation")
    _common(reset, pool=False)
    reset.add_argument("part", help="the partition key, <subset>__<part>")
    reset.set_defaults(func=cmd_reset)
    discover = sub.add_parser("discover", help="add new parts as Dagster partitions")
    _common(discover, pool=False)
    discover.set_defaults(func=cmd_discover)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RedisUnavailable, EmbeddedServerError) as error:
        print(f"laion-dagster: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
