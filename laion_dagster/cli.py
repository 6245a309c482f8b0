"""`laion-dagster`: run, demo, up, worker, status, errors export|retry, reset, discover.

Flags override LAION_* environment variables, which override the defaults; all three are the
one settings model (`core/settings.py`).
"""

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import textwrap
import time
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePath

from pydantic import ValidationError

from laion_dagster.core.processes import exclusive
from laion_dagster.core.queue import embedded
from laion_dagster.core.queue.connection import RedisUnavailable, connect
from laion_dagster.core.queue.embedded import EmbeddedServerError
from laion_dagster.core.settings import Settings, setting_kind
from laion_dagster.usage import UsageError

DEMO_HOSTS = ("img-a.test", "img-b.test", "img-c.test")
# The demo's own folder (<data_dir>/demo) holds this marker and only these names: it clears
# them on its next run, and refuses to clear a folder holding anything else.
DEMO_MARKER = ".laion-dagster-demo"
DEMO_ENTRIES = ("parquet", "store", "redis", "dagster", "logs", "inputs.json")


def _explain(error: ValidationError, from_flags: bool) -> str:
    """One sentence per bad setting: where it came from, its value, and what is allowed."""
    sentences = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else "settings"
        where = ("--" + name.replace("_", "-")) if from_flags else f"LAION_{name.upper()}"
        message = item["msg"].removeprefix("Value error, ")
        given = item.get("input")
        shown = repr(str(given) if isinstance(given, PurePath) else given)
        sentences.append(f"{where} {shown} is not allowed: {message[:1].lower()}{message[1:]}")
    return "; ".join(sentences)


def _settings(args: argparse.Namespace) -> Settings:
    try:
        base = Settings()
    except ValidationError as error:
        raise UsageError(_explain(error, from_flags=False)) from None
    overrides = {name: getattr(args, name, None) for name in Settings.model_fields}
    try:
        return base.with_overrides(**overrides).with_remembered_inputs()
    except ValidationError as error:
        raise UsageError(_explain(error, from_flags=True)) from None


# The settings each command that only looks (or tidies) actually reads; the commands that
# download take them all.
# (A store in a bucket is reached with the same object-storage settings as the run used.)
S3 = ("s3_endpoint_url", "s3_region", "s3_profile", "s3_virtual_addressing")
LOOK = ("data_dir", "parquet_dir", "store_dir", "redis_url", "prefix", *S3)
COMMAND_SETTINGS = {
    "status": LOOK + ("heartbeat_interval",),
    "export": LOOK + ("error_dir",),
    "retry": LOOK + ("error_dir", "url_column", "caption_column", "save_additional_columns",
                     "key_columns", "shard_size"),
    "reset": LOOK,
    "discover": ("data_dir", "parquet_dir", "store_dir", *S3),
}


@contextlib.contextmanager
def _borrowing_embedded(settings: Settings) -> Iterator[None]:
    """A command that only looks at the queue leaves no server behind: the embedded server is
    stopped afterwards if this command had to start it and no run holds the folder."""
    directory = None if settings.redis_url else settings.redis_dir
    was_running = directory is None or embedded.running(directory)
    try:
        yield
    finally:
        if not was_running and not exclusive.is_held(settings.state_dir):
            embedded.stop(directory)


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
        described = field.description or ""
        shown = (f" (default: {default})" if default not in (None, [], {})
                 and "default" not in described else "")
        options: dict = {"dest": name, "default": None, "help": (field.description or "") + shown}
        if typing.get_origin(kind) is typing.Literal:
            options["choices"] = typing.get_args(kind)
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            options.update(type=_comma_list, metavar="A,B,...")
        elif typing.get_origin(kind) is dict:
            options.update(type=_host_map, metavar="NAME=ADDRESS,...")
        elif kind in (int, float):
            options["type"] = kind
        # (A path stays a string until the settings read it: Path() would make s3://b/x the
        # local folder s3:/b/x before they could refuse it.)
        group.add_argument(flag, **options)


def _common(parser: argparse.ArgumentParser, command: str | None = None) -> None:
    _settings_flags(parser, COMMAND_SETTINGS.get(command) if command else None)


def cmd_worker(args: argparse.Namespace) -> int:
    from laion_dagster.core.control.hosts import store_problem
    from laion_dagster.worker.supervisor import Supervisor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s "
                                                   "%(message)s")
    settings = _settings(args)
    # A full disk only pauses a pool (it waits for space by itself); a store it cannot write
    # at all is a mistake to report now, not a pause to sit in forever.
    problem = store_problem(settings, disk=False)
    if problem:
        raise UsageError(problem)
    with _borrowing_embedded(settings):
        return Supervisor(settings).run()


def cmd_run(args: argparse.Namespace) -> int:
    from laion_dagster.run import RunCommand, format_summary

    settings = _settings(args)
    result = RunCommand(settings).run()
    print(format_summary(result, settings))
    return result.exit_code


def _clear_demo_folder(folder: Path) -> None:
    """Remove what an earlier demo made in `folder`, and nothing else: a folder without the
    demo's marker, or holding other names, is refused."""
    if folder.exists():
        entries = {p.name for p in folder.iterdir()} - {exclusive.LOCK_FILE}
        if entries and DEMO_MARKER not in entries:
            raise UsageError(f"{folder} exists and was not made by the demo (it has no "
                             f"{DEMO_MARKER} file); the demo clears only a folder it made. "
                             "Move it away, or give the demo another --data-dir")
        foreign = sorted(entries - {DEMO_MARKER, *DEMO_ENTRIES})
        if foreign:
            raise UsageError(f"{folder} holds files the demo did not make "
                             f"({', '.join(foreign[:5])}); move them away first")
    embedded.stop(folder / "redis")
    for name in DEMO_ENTRIES:
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).write_text("Made by `laion-dagster demo`, which clears this folder "
                                      "(only the names it makes) on its next run.\n")


def _ui_hint(settings: Settings) -> str:
    """A command that opens the demo in the UI, ready to paste: absolute paths, and every
    setting the demo changed, so the UI sees the demo's parts, queue and files."""
    dagster = Path(sys.executable).with_name("dagster")
    env = {"DAGSTER_HOME": settings.state_dir / "dagster", "LAION_DATA_DIR": settings.data_dir,
           "LAION_PARQUET_DIR": settings.parts_root, "LAION_STORE_DIR": settings.store_root,
           "LAION_PREFIX": settings.prefix}
    words = [f"{k}={shlex.quote(str(v))}" for k, v in env.items()]
    return " ".join([*words, shlex.quote(str(dagster)), "dev", "-m", "laion_dagster.definitions"])


def cmd_demo(args: argparse.Namespace) -> int:
    from laion_dagster.demo.dataset import make_images, write_dataset
    from laion_dagster.demo.server import ImageServer
    from laion_dagster.run import RunCommand, format_summary

    base = _settings(args)
    demo_dir = (base.home / "demo").absolute()
    # The demo is self-contained: its own Redis, store and Dagster instance, whatever the
    # environment says, and only loopback traffic to the image server it starts.
    # A store named on the command line (a bucket, say) is used; the environment's is not.
    store = base.store_dir if args.store_dir else demo_dir / "store"
    settings = base.model_copy(update={
        "data_dir": demo_dir, "parquet_dir": demo_dir / "parquet", "store_dir": store,
        "error_dir": None, "redis_url": None, "prefix": "laion-demo",
        "shard_size": args.shard_size or 250, "processes": args.processes or 2,
        "concurrency": args.concurrency or 32, "allow_private_addresses": True,
        "host_map": {host: "127.0.0.1" for host in DEMO_HOSTS}, "timeout": 10.0,
        "heartbeat_interval": 2.0,
        # Its server drops some first requests on purpose (/flaky/): a short wait shows the
        # later tries at work without making the demo wait the default retry_delay.
        "retry_delay": args.retry_delay if args.retry_delay is not None else 3.0,
    })
    with exclusive.lock(demo_dir, "laion-dagster demo"):
        _clear_demo_folder(demo_dir)
        os.environ["DAGSTER_HOME"] = str(demo_dir / "dagster")
        print(f"generating a LAION-like demo dataset in {demo_dir} ...", flush=True)
        images = make_images(200)
        with ImageServer({image.path: image for image in images}) as server:
            dataset = write_dataset(settings.parts_root, [server.url(h) for h in DEMO_HOSTS],
                                    rows_per_part=args.rows_per_part, images=images)
            print(f"{len(dataset.parts)} parts, {len(dataset.expected_by_row):,} rows, served "
                  f"from {server.url()} as {', '.join(DEMO_HOSTS)}", flush=True)
            result = RunCommand(settings, lock_state=False).run()
    print(format_summary(result, settings))
    print(f"\nsee it in the UI (paste this):\n  {_ui_hint(settings)}")
    return result.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from laion_dagster.core.control.status import collect, render
    from laion_dagster.core.queue.protocol import Queue

    settings = _settings(args)
    with _borrowing_embedded(settings):
        client = connect(settings, name="laion-dagster-status", retries=2)
        queue = Queue(client, settings.prefix)
        try:
            while True:
                status = collect(queue, settings)
                text = json.dumps(status.to_dict(), indent=2) if args.json else render(status)
                if not args.watch:
                    print(text)
                    return 0
                print("\033[2J\033[H" + time.strftime("%H:%M:%S  ") + text, flush=True)
                time.sleep(args.watch)
        finally:
            client.close()


@contextlib.contextmanager
def _queue(settings: Settings, name: str) -> Iterator:
    """The queue, for a command a person waits on: a short retry budget, and no embedded
    server left behind."""
    from laion_dagster.core.queue.protocol import Queue

    with _borrowing_embedded(settings):
        client = connect(settings, name=name, retries=2)
        try:
            yield Queue(client, settings.prefix, settings.visibility_timeout,
                        settings.max_deliveries)
        finally:
            client.close()


def _known_part(queue, part: str) -> None:
    known = queue.partitions()
    if part not in known:
        raise UsageError(f"unknown part {part!r}; known parts: "
                         f"{', '.join(known[:10]) or 'none'}{' …' if len(known) > 10 else ''}")


def cmd_errors_export(args: argparse.Namespace) -> int:
    from laion_dagster.core.control.accounting import export_errors

    settings = _settings(args)
    with _queue(settings, "laion-dagster-errors") as queue:
        _known_part(queue, args.part)
        out = (args.out or Path.cwd()).absolute()
        try:
            parquet_path, jsonl_path, count = export_errors(queue, args.part, settings, out,
                                                            progress=_progress_bar("export"))
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
    print(f"{count:,} failed rows of {args.part}: {parquet_path} and {jsonl_path}")
    return 0


def _progress_bar(label: str, width: int = 30):
    """A progress callback that redraws one line on a terminal and stays silent in logs."""
    if not sys.stderr.isatty():
        return None

    from laion_dagster.core.control.status import bar

    def show(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{label} {bar(done, max(total, 1), width)} {done:,}/{total:,}", end=end,
              file=sys.stderr, flush=True)

    return show


def _where_flags(settings: Settings) -> str:
    """The flags that point another command at the same data (for hints to paste)."""
    flags = []
    for name in ("data_dir", "parquet_dir", "store_dir", "prefix"):
        value = getattr(settings, name)
        if value is not None and (name != "prefix" or value != "laion"):
            flags += ["--" + name.replace("_", "-"), shlex.quote(str(value))]
    return " ".join(flags)


def cmd_errors_retry(args: argparse.Namespace) -> int:
    from laion_dagster.core.control.hosts import is_stale
    from laion_dagster.core.control.retry import RetryRefused, retry_failed
    from laion_dagster.core.input import parts

    settings = _settings(args)
    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    with _queue(settings, "laion-dagster-errors") as queue:
        _known_part(queue, args.part)
        try:
            part = parts.locate(settings.parts_root, args.part, queue.part(args.part).path)
            report = retry_failed(queue, part, settings, classes)
        except (parts.PartError, RetryRefused, FileNotFoundError) as error:
            raise UsageError(str(error)) from None
        workers = [h for h, r in queue.hosts().items() if not is_stale(r, settings)]
    if not report.rows:
        print(f"no failed rows of {', '.join(classes)} in {args.part}; nothing to retry")
        return 0
    by_class = ", ".join(f"{k} {v:,}" for k, v in sorted(report.classes.items()))
    print(f"retry round {report.round}: {report.rows:,} rows ({by_class}) queued again in "
          f"{report.shards} shards.")
    where = _where_flags(settings)
    if workers:
        print(f"The running workers ({', '.join(sorted(workers))}) pick them up; the part is "
              "finalized again when they are done.")
    else:
        print("No worker is running to download them. Run\n"
              f"  laion-dagster run {where}\n"
              "which downloads them and finalizes the part again (or start workers with "
              f"`laion-dagster worker {where}` next to a Dagster daemon).")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _queue(settings, "laion-dagster-reset") as queue:
        if args.part not in queue.partitions():
            raise UsageError(f"{args.part} was never enqueued; nothing to reset")
        generation = queue.reset(args.part)
    print(f"{args.part}: generation {generation}; its queued shards and counts are dropped. "
          "Enqueue it again (the launch_or_hold sensor does, or `run`, or the UI) to download "
          "it with the current settings; shards already complete on disk are kept unless "
          "overwrite is set")
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from laion_dagster.core.input import parts
    from laion_dagster.defs.partitions import PARTS
    from laion_dagster.instance import get_instance

    settings = _settings(args)
    instance = get_instance(settings)
    found = parts.survey(settings.parts_root)
    keys = [p.key for p in found.parts]
    known = set(instance.get_dynamic_partitions(PARTS))
    new = [k for k in keys if k not in known]
    if new:
        instance.add_dynamic_partitions(PARTS, new)
    for part in found.parts:
        print(("added  " if part.key in new else "known  ") + f"{part.key:<24} {part.path.name}")
    for problem in found.problems:
        print(f"skipped {problem}")
    if not keys:
        print(parts.nothing_found(settings.parts_root, found))
    print(f"{len(new)} new, {len(keys)} parts at {settings.parts_root}")
    stale = sorted(known - set(keys))
    if stale and args.prune:
        for key in stale:
            instance.delete_dynamic_partition(PARTS, key)
        print(f"removed {len(stale)} partitions without a part file: {', '.join(stale[:5])}"
              f"{' …' if len(stale) > 5 else ''} (their runs stay in the instance's history)")
    elif stale:
        print(f"{len(stale)} partitions of the instance have no part file here (e.g. "
              f"{stale[0]}; keys of versions before 0.2 looked like "
              "laion2B-en__part-00000-<uuid>-c000); `discover --prune` removes them")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from laion_dagster.core.processes import children
    from laion_dagster.instance import get_instance

    settings = _settings(args)
    with exclusive.lock(settings.state_dir, "laion-dagster up"):
        # Created and migrated now: dagster dev's webserver, daemon and code servers would
        # otherwise all create a new instance at once.
        get_instance(settings).dispose()
        home = Path(os.environ["DAGSTER_HOME"])
        os.environ.update(settings.to_env())
        if settings.parts_root.exists():
            settings.remember_inputs()
        started_redis = not settings.redis_url and not embedded.running(settings.redis_dir)
        if started_redis:  # started here, it dies with this command, even by SIGKILL
            embedded.ensure_running(settings.redis_dir, tied=True)
        connect(settings).close()  # fails early if Redis cannot be reached
        # Ctrl-C, `kill` and systemd's SIGTERM all stop everything in order, whatever this
        # process inherited (a script's background job starts with SIGINT ignored).
        stopped: list[int] = []
        previous = {sig: signal.signal(sig, lambda signum, _: stopped.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        dagster = Path(sys.executable).with_name("dagster")
        running = [
            children.Child(children.start([sys.executable, "-m", "laion_dagster.cli",
                                           "worker"]),
                           signal.SIGTERM, settings.shutdown_grace + 30),
            # dagster dev stops its webserver, daemon and code servers on a Ctrl-C to its
            # group, as at a terminal.
            children.Child(children.start([str(dagster) if dagster.exists() else "dagster",
                                           "dev", "-m", "laion_dagster.definitions", "-p",
                                           str(args.port)]),
                           signal.SIGINT, 30.0, whole_group=True),
        ]
        print(f"Dagster UI on http://127.0.0.1:{args.port} (DAGSTER_HOME={home}); "
              f"workers writing to {settings.store_root}. Ctrl-C stops everything.", flush=True)
        try:
            while not stopped and all(c.process.poll() is None for c in running):
                time.sleep(0.2)
            if stopped:
                print(f"{signal.Signals(stopped[0]).name}: stopping; workers finish their "
                      "shards, dagster dev shuts down ...", flush=True)
            else:
                gone = next(c for c in running if c.process.poll() is not None)
                print(f"{' '.join(gone.process.args[1:3])} exited with code "
                      f"{gone.process.returncode}; stopping the rest", flush=True)
        finally:
            children.stop_all(running)
            if started_redis:
                embedded.stop(settings.redis_dir)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 128 + stopped[0] if stopped else 1


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, but never breaking a line inside a flag (`--allow-` / `private-addresses`)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)


PART_HELP = "the part's key, <subset>/<part> (e.g. laion2B-en/00042; `status` lists them)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="laion-dagster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, description: str, func=None, usage: str | None = None,
                settings: str | None = None, parent=sub) -> argparse.ArgumentParser:
        """A subcommand with the settings flags it takes (`settings`: its entry in
        COMMAND_SETTINGS; None takes every setting) and the function that runs it."""
        # Commands that take every setting get a short usage line: the settings are listed
        # below the description, not in a wall of flags above it.
        made = parent.add_parser(name, help=summary, description=description, usage=usage,
                                 formatter_class=_HelpFormatter)
        if func is not None:
            _common(made, settings)
            made.set_defaults(func=func)
        return made

    command("run", "download every part of a folder, then exit",
            "Download every part at --parquet-dir into --store-dir on this machine, through "
            "Dagster, with a local worker pool. Give both (or --data-dir, which holds "
            "parquet/ and store/). --parquet-dir is one file, a folder of files (its name is "
            "the subset) or a folder of subset folders (LAION's releases); each file is a "
            "part: parquet, csv, tsv, txt (one URL a line), json or jsonl, those but parquet "
            "also gzipped (.csv.gz). URLs are read from the URL/url column (--url-column), "
            "captions from TEXT/caption (--caption-column). Private, loopback and link-local "
            "addresses are refused (class blocked_address) unless --allow-private-addresses "
            "(or --allowed-networks CIDR,...) is given. Exit 0 when every part is final, 1 "
            "when a part fails or nothing can move for stall_timeout, 2 for a mistake before "
            "anything starts, 130/143 on Ctrl-C/SIGTERM after stopping everything it started. "
            "Running it again resumes. Its queue and Dagster instance live in --data-dir, else "
            "beside the store (<store_dir>/.laion-dagster).", cmd_run,
            "laion-dagster run --parquet-dir PATH --store-dir PATH [settings ...]")
    command("demo", "run on a generated dataset served from loopback",
            "Generate a small LAION-like dataset in <data_dir>/demo, serve its images from a "
            "loopback server, and download it with `run`. The demo clears only the folder it "
            "made (it holds a .laion-dagster-demo marker).", cmd_demo,
            "laion-dagster demo [--rows-per-part N] [settings ...]",
            ).add_argument("--rows-per-part", dest="rows_per_part", type=int, default=1000,
                           help="rows in each of the four generated parts "
                                "(default: %(default)s)")
    command("up", "embedded Redis + dagster dev + a local worker pool",
            "Start the embedded Redis, `dagster dev` (UI and daemon, sensors on) and a local "
            "worker pool; one Ctrl-C stops all three.", cmd_up,
            "laion-dagster up [--port PORT] [settings ...]",
            ).add_argument("--port", type=int, default=3000, help="the UI's port (default: 3000)")
    command("worker", "a worker pool on this host (downloader.py)",
            "Run P worker processes × C fetches against the queue until stopped "
            "(SIGTERM/Ctrl-C finish or hand back their shards).", cmd_worker,
            "laion-dagster worker [settings ...]")
    status = command("status", "queue, rates, ETA, parts and hosts (speed.py)",
                     "Show the queue depth, recent and hourly rates, ETAs, every part and every "
                     "worker host, from named Redis keys only.", cmd_status, settings="status")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                        help="redraw every SECONDS (2 if not given) until Ctrl-C")
    status.add_argument("--json", action="store_true",
                        help="print the same figures as JSON, for scripts")
    errors = command("errors", "a part's failed rows (save_error_task.py)",
                     "Export a part's failed rows, or queue some of them again.")
    errors_sub = errors.add_subparsers(dest="errors_command", required=True)
    export = command("export", "write a part's failed rows to files",
                     "Write a part's failed and invalid rows as parquet and JSON lines.",
                     cmd_errors_export, settings="export", parent=errors_sub)
    export.add_argument("--out", type=Path, help="folder for the files (default: here)")
    retry = command("retry", "queue a part's failed rows again",
                    "Queue a finished part's failed rows of some error classes again (only "
                    "those rows).", cmd_errors_retry, settings="retry", parent=errors_sub)
    retry.add_argument("--classes", default="timeout,connection,dns,http_5xx",
                       help="error classes to retry, comma-separated (default: %(default)s)")
    command("reset", "start a part over as a new generation",
            "Drop a part's queued shards and counts; its next enqueue starts it over with the "
            "current settings (shards complete on disk are kept).", cmd_reset,
            settings="reset")
    command("discover", "add new parts as Dagster partitions",
            "Add a Dagster partition for every part under --parquet-dir, and list the files "
            "that cannot be parts, with why.", cmd_discover, settings="discover",
            ).add_argument("--prune", action="store_true",
                           help="remove partitions that have no part file any more")
    for name, parsers in (("export", errors_sub), ("retry", errors_sub), ("reset", sub)):
        parsers.choices[name].add_argument("part", help=PART_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    from laion_dagster.core.input.parts import PartError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RedisUnavailable, EmbeddedServerError, UsageError, exclusive.FolderBusy,
            exclusive.FolderUnwritable, PartError) as error:
        print(f"laion-dagster: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
