"""The `laion` resource: the settings model, overridable from Dagster config.

Every field is optional; an unset field keeps what the LAION_* environment (or its default)
says, so the same names work from the UI's launchpad, `dagster ... --config`, and the shell.
"""


from contextlib import contextmanager

from dagster import ConfigurableResource

from laion_dagster.core.connection import connect
from laion_dagster.core.queue import Queue
from laion_dagster.core.settings import Settings


class LaionResource(ConfigurableResource):
    data_dir: str | None = None
    parquet_dir: str | None = None
    store_dir: str | None = None
    error_dir: str | None = None
    redis_url: str | None = None
    prefix: str | None = None
    url_column: str | None = None
    caption_column: str | None = None
    shard_size: int | None = None
    queue_threshold: int | None = None
    queue_high_watermark: int | None = None
    output_format: str | None = None
    min_success_rate: float | None = None

    def settings(self) -> Settings:
        overrides = {name: getattr(self, name) for name in type(self).model_fields}
        return Settings().with_overrides(**overrides)

    @contextmanager
    def queue(self):
        settings = self.settings()
        client = connect(settings, name="laion-dagster")
        try:
            yield Queue(client, settings.prefix, settings.visibility_timeout,
                        settings.max_deliveries)
        finally:
            client.close()
