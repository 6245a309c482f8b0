"""The Dagster instance our commands use: $DAGSTER_HOME, or one in the state folder (the data
directory, else beside the store), so it lives with the data it describes.

Kept out of the core because it is about Dagster; kept out of `defs/` because it is not a
definition. `run`, `up` and `discover` share it so they all see the same runs and partitions.
"""

from dagster import DagsterEventType, DagsterInstance

from laion_dagster.core.settings import Settings
from laion_dagster.dagster_home import (
    ensure_dagster_home,
    instance_lock,
    repair_doubled_heads,
    touch_storage,
)


def get_instance(settings: Settings, say=print) -> DagsterInstance:
    """The instance, its home made whole first (ensure_dagster_home), opened under
    instance_lock with a doubled schema head repaired (and said)."""
    home = ensure_dagster_home(settings)
    with instance_lock(home):
        for path in repair_doubled_heads(home):
            say(f"repaired {path}: its schema revision was stamped twice (two processes "
                "created the instance at once)")
        instance = DagsterInstance.get()
        touch_storage(instance)  # a home of the user's may have none yet: now, under the lock
    return instance


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


