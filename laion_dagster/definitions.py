"""What `workspace.yaml` loads: the assets, sensors, jobs and the `laion` resource."""

from dagster import Definitions

from laion_dagster.defs.assets import enqueued_part, part_images
from laion_dagster.defs.jobs import enqueue_job, finalize_job, local_workers
from laion_dagster.defs.observations import QUEUE, WORKER_HOSTS
from laion_dagster.defs.resources import LaionResource
from laion_dagster.defs.sensors import (
    discover_parts,
    finalize_parts,
    launch_or_hold,
    watch_downloads,
)

defs = Definitions(
    assets=[enqueued_part, part_images, QUEUE, WORKER_HOSTS],
    jobs=[enqueue_job, finalize_job, local_workers],
    sensors=[discover_parts, launch_or_hold, finalize_parts, watch_downloads],
    resources={"laion": LaionResource()},
)
