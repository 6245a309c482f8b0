"""The Dagster instance's home folder: made whole before anything opens it, its storage created
one process at a time, and a schema head doubled by two processes that created it at once
repaired where found.

Dagster is imported only to create a new home, so that `run` makes it in its first moments:
a UI started a second after it then finds it whole.
"""

import contextlib
import fcntl
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from importlib import metadata, resources
from pathlib import Path

from laion_dagster.core.settings import Settings
from laion_dagster.usage import UsageError


def ensure_dagster_home(settings: Settings) -> Path:
    """Point DAGSTER_HOME somewhere persistent with our dagster.yaml (telemetry off).

    A DAGSTER_HOME that the user set keeps its own dagster.yaml; one without any gets ours. A
    new home appears whole: made aside, its databases created and stamped there, then renamed
    into place. A UI started at the same moment (the user's `dagster-webserver`, a second after
    `run`) finds no home, or a finished one; it never creates the databases at the same time
    as we do, the race repair_doubled_heads describes.
    """
    home = os.environ.get("DAGSTER_HOME")
    path = Path(home) if home else settings.state_dir / "dagster"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
        try:
            aside.chmod(0o755)
            _copy_config(aside / "dagster.yaml")
            _create_storage(aside)
            with contextlib.suppress(OSError):  # made meanwhile by another process: it stands
                aside.rename(path)
        finally:
            if aside.exists():  # ours: mkdtemp's own name
                shutil.rmtree(aside)
    config = path / "dagster.yaml"
    if not config.exists():
        _copy_config(path / f".dagster.yaml.new-{os.getpid()}")
        os.replace(path / f".dagster.yaml.new-{os.getpid()}", config)
    os.environ["DAGSTER_HOME"] = str(path)
    return path


def _create_storage(home: Path) -> None:
    """Every database of a new instance at `home`, created and stamped now.

    Creating them runs every schema migration Dagster has, the most CPU a new instance costs;
    the result is the same for every new home of one Dagster version. So the first one made on
    a machine is kept in the user's cache folder, whole (made aside and renamed), and later new
    homes copy it instead.
    """
    template = storage_template()
    if template is not None and all((template / name).is_file() for name in SQLITE_STORAGES):
        shutil.copytree(template, home, dirs_exist_ok=True)
        return
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        touch_storage(instance)
    if template is not None:
        with contextlib.suppress(OSError):  # a cache we cannot write is only slower
            _keep_template(home, template)


def storage_template() -> Path | None:
    """Where this Dagster version's empty instance storage is kept (None: version unknown)."""
    try:
        version = metadata.version("dagster")
    except metadata.PackageNotFoundError:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "laion-dagster" / f"dagster-{version}-storage"


def _keep_template(home: Path, template: Path) -> None:
    template.parent.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{template.name}.new-", dir=template.parent))
    try:
        for name in SQLITE_STORAGES:
            (aside / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(home / name, aside / name)
        with contextlib.suppress(OSError):  # made meanwhile by another process: it stands
            aside.rename(template)
    finally:
        if aside.exists():  # ours: mkdtemp's own name
            shutil.rmtree(aside)


def touch_storage(instance) -> None:
    """Opens each of the instance's storages, which creates any that does not exist yet."""
    instance.get_runs(limit=1)
    instance.all_instigator_state()
    instance.get_dynamic_partitions("parts")


def _copy_config(target: Path) -> None:
    with resources.as_file(resources.files("laion_dagster") / "dagster.yaml") as source:
        shutil.copyfile(source, target)


# The sqlite databases Dagster creates when an instance is first opened, each stamped with its
# schema's alembic revision.
SQLITE_STORAGES = ("history/runs.db", "history/runs/index.db", "schedules/schedules.db")


class InstanceBroken(UsageError):
    """The instance's storage cannot be opened; the message says how to repair it (the
    commands report it as any mistake found before anything starts: one line, exit 2)."""


def schema_head() -> str:
    """The alembic revision of the schema this Dagster creates."""
    import dagster._core.storage as storage
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(Path(storage.__file__).parent / "alembic")).get_current_head()


def repair_doubled_heads(home: Path) -> list[Path]:
    """Databases of the instance at `home` whose alembic_version table names two revisions,
    left with the right one; returns them.

    Two processes that open a new instance at once (`run`, and a `dagster-webserver` started
    beside it) race in Dagster's sqlite storages: one finds no tables, creates them from the
    current schema and stamps its head; the other, a moment later, finds the tables but no
    revision yet, and stamps an older one it takes such tables to be at. Every Dagster process
    then fails to open the instance ("Version table 'alembic_version' has more than one head
    present"). The tables are the current schema, so the head is the truth. Without the head
    among the revisions the race is not what happened: that is refused, with the command that
    migrates an instance.
    """
    repaired = []
    head = None
    for name in SQLITE_STORAGES:
        path = home / name
        if not path.is_file():
            continue
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as db:
            try:
                heads = {row[0] for row in db.execute("SELECT version_num FROM alembic_version")}
            except sqlite3.OperationalError:
                continue  # not stamped (yet): Dagster's own to do
            if len(heads) <= 1:
                continue
            head = head or schema_head()
            if head not in heads:
                raise InstanceBroken(
                    f"{path}: its alembic_version table names several schema revisions "
                    f"({', '.join(sorted(heads))}), none of them this Dagster's ({head}); "
                    f"repair it with `DAGSTER_HOME={home} dagster instance migrate`")
            with db:
                db.execute("DELETE FROM alembic_version WHERE version_num != ?", (head,))
            repaired.append(path)
    return repaired


LOCK_NAME = ".laion-dagster-instance.lock"


@contextlib.contextmanager
def instance_lock(home: Path) -> Iterator[None]:
    """One of our processes at a time repairs, creates or opens the instance (a file lock in
    its home)."""
    with open(Path(home) / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file lets the lock go
