"""The `laion` resource: the settings model, overridable from Dagster config.

Every field is optional; an unset field keeps what the LAION_* environment (or its default)
says, so the same names work from the UI's launchpad, `dagster ... --config`, and the shell.
"""


import typing
from contextlib import contextmanager
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field, create_model

from laion_dagster.core.queue.connection import connect
from laion_dagster.core.queue.protocol import Queue
from laion_dagster.core.settings import Settings, setting_kind


def _config_type(name: str) -> typing.Any:
    """The Dagster config type of a setting: optional, and plain str where Dagster has no
    equivalent (paths, choices); the settings model still validates the value."""
    kind = setting_kind(name)
    if kind is Path or typing.get_origin(kind) is typing.Literal:
        kind = str
    return kind | None


# One optional config field per setting, made from the settings model so the UI's launchpad
# offers every setting with its description, and the two can never drift apart.
_SettingsConfig = create_model(
    "_SettingsConfig", __base__=ConfigurableResource,
    **{name: (_config_type(name), Field(None, description=field.description))
       for name, field in Settings.model_fields.items()},
)


class LaionResource(_SettingsConfig):
    """The settings, as Dagster config; per-part settings (see core/shards/recipe.py) set here reach
    every worker through the part's recipe."""

    def settings(self) -> Settings:
        overrides = {name: getattr(self, name) for name in type(self).model_fields}
        return Settings().with_overrides(**overrides)

    @contextmanager
    def queue(self, retries: int | None = None):
        """The queue; `retries`: the connection's retry budget (default: the clients' own, ~25
        s of backoff), fewer for a sensor that must answer within its tick."""
        settings = self.settings()
        client = (connect(settings, name="laion-dagster") if retries is None
                  else connect(settings, name="laion-dagster", retries=retries))
        try:
            yield Queue(client, settings.prefix, settings.visibility_timeout,
                        settings.max_deliveries)
        finally:
            client.close()
