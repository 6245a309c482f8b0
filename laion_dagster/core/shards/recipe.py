"""A part's recipe: the per-sample settings every shard of the part is produced with.

Output format, filters, hash verification, resizing and `overwrite` are fixed when a part is
enqueued and travel with it in Redis (`part:<p>` field `recipe`). Workers on every host apply
the part's recipe, not their own environment, so:
- what an operator sets in Dagster config or on `laion-dagster run` reaches workers on other
  machines without restarting them, and
- one part never ends up with shards in two formats or two sizes because two hosts were started
  with different variables.
A worker's own settings decide only how it fetches (timeouts, concurrency, address guard, ...),
and serve as the recipe of a part enqueued without one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache

from laion_dagster.core.images import checks
from laion_dagster.core.settings import Settings

# The Settings fields that make up a recipe (same names, same meaning).
RECIPE_FIELDS = ("output_format", "overwrite", "min_image_size", "max_image_area",
                 "max_aspect_ratio", "verify_hash_column", "resize_mode", "image_size",
                 "resize_only_if_bigger", "encode_format", "encode_quality")


@dataclass(frozen=True)
class Recipe:
    output_format: str = "webdataset"
    overwrite: bool = False
    min_image_size: int = 0
    max_image_area: int | None = None
    max_aspect_ratio: float | None = None
    verify_hash_column: str | None = None
    resize_mode: str = "no"
    image_size: int = 256
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95

    @classmethod
    def from_settings(cls, settings: Settings) -> Recipe:
        return cls(**{name: getattr(settings, name) for name in RECIPE_FIELDS})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    @lru_cache(maxsize=64)
    def from_json(text: str) -> Recipe:
        """Parse a stored recipe, validated by the settings model (cached: every shard asks)."""
        given = json.loads(text)
        checked = Settings.model_validate(given)
        return Recipe(**{name: getattr(checked, name) for name in RECIPE_FIELDS})

    @cached_property
    def filters(self) -> checks.Filters:
        return checks.Filters(min_size=self.min_image_size, max_area=self.max_image_area,
                              max_aspect_ratio=self.max_aspect_ratio)

    @cached_property
    def resize(self) -> checks.Resize:
        return checks.Resize(mode=self.resize_mode, size=self.image_size,
                             only_if_bigger=self.resize_only_if_bigger,
                             encode_format=self.encode_format, quality=self.encode_quality)

    @property
    def made_with(self) -> dict:
        """What decides a shard's content (everything but `overwrite`), as _stats.json keeps
        it; a shard on disk made with anything else is not this recipe's."""
        content = asdict(self)
        del content["overwrite"]
        return content

    def differences(self, other: Recipe) -> dict[str, tuple]:
        """Fields whose values differ: (ours, theirs)."""
        mine, theirs = asdict(self), asdict(other)
        return {k: (mine[k], theirs[k]) for k in RECIPE_FIELDS if mine[k] != theirs[k]}
