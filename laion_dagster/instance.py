"""The Dagster instance our commands use: $DAGSTER_HOME, or one in the state folder (the data
directory, else beside the store), so it lives with the data it describes.

Kept out of the core because it is about Dagster; kept out of `defs/` because it is not a
definition. `run`, `up` and `discover` share it so they all see the same runs and partitions.
"""

import os
import shutil
from importlib import resources
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance

from laion_dagster.core.settings import Settings


def ensure_dagster_home(settings: Settings) -> Path:
    """Point DAGSTER_HOME somewhere persistent with our dagster.yaml (telemetry off).

    A DAGSTER_HOME that the user set keeps its own dagster.yaml; one without any gets ours.
    """
    home = os.environ.get("DAGSTER_HOME")
    path = Path(home) if home else settings.state_dir / "dagster"
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        with resources.as_file(resources.files("laion_dagster") / "dagster.yaml") as source:
            shutil.copyfile(source, config)
    os.environ["DAGSTER_HOME"] = str(path)
    return path


def get_instance(settings: Settings) -> DagsterInstance:
    ensure_dagster_home(settings)
    return DagsterInstance.get()


def failure_message(instance: DagsterInstance, run_id: str) -> str:
    """The first step failure of a run, as its author wrote it (not the whole traceback)."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records
    for record in records:
        event = record.event_log_entry.dagster_event
        data = event.step_failure_data if event else None
        if data is None:
            continue
        if data.user_failure_data and data.user_failure_data.description:
            return data.user_failure_data.description
        if data.error:
            return data.error.message.strip()
    return "the run failed (see the run's logs in the Dagster UI)"
