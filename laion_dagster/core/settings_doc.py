"""docs/settings.md, made from the settings model so that the two cannot drift apart.

    python -m laion_dagster.core.settings_doc > docs/settings.md

regenerates it; tests/test_docs.py fails while the file differs from `settings_markdown()`.
Every row comes from `Settings.model_fields` (name, default, description), the original
scripts' names from `ORIGINAL_NAMES`, the per-part marks from the recipe's fields. Only the
group headings and their one-line introductions are written here. No Dagster imports: this runs
wherever the package is installed.
"""

from __future__ import annotations

import json
import re
import sys
import typing
from pathlib import PurePath

from pydantic.fields import FieldInfo

from laion_dagster.core.settings import ORIGINAL_NAMES, Settings, setting_kind
from laion_dagster.core.shards.recipe import RECIPE_FIELDS

REGENERATE = "python -m laion_dagster.core.settings_doc > docs/settings.md"

# Groups, in the order the model declares its fields: a group starts at its first setting and
# holds every setting declared after it, up to the next group's first. A new setting declared
# among its neighbours so lands in their group; a group whose first setting is gone is an error.
GROUPS: tuple[tuple[str, str, str], ...] = (
    ("Where things live", "data_dir",
     "Folders, or bucket URLs where a bucket is allowed (see [buckets.md](buckets.md))."),
    ("Buckets", "s3_endpoint_url",
     "Unset, these come from where the AWS SDKs read them; credentials never are settings "
     "(they would show in Dagster's run config)."),
    ("The queue (Redis)", "redis_url",
     "Unset `redis_url` starts the embedded server in the state folder."),
    ("Reading parts and queuing shards", "url_column",
     "How a part's rows are read and cut into shards, and how much the queue may hold."),
    ("Worker hosts", "processes",
     "How a worker pool works and when a worker host pauses."),
    ("Dagster UI and `run`", "observe_interval",
     "How often the UI hears of a download, and when `run` gives up."),
    ("Fetching", "connect_timeout",
     "Per URL: time limits, later tries, what is refused, and how names are resolved."),
    ("Image checks", "min_image_size",
     "A row whose image fails a check is stored as failed, with class `filtered` or "
     "`hash_mismatch`; the sha256 of every image is recorded either way."),
    ("Resizing", "resize_mode",
     "img2dataset's modes: `keep_ratio` (smallest side to `image_size`), "
     "`keep_ratio_largest` (largest side), `center_crop` (smallest side, then the middle "
     "square), `border` (largest side, padded to a black square). An image already of the "
     "right size and format is kept as downloaded; JPEGs are shrunk while decoding."),
    ("Outputs and checks", "output_format",
     "What a shard is made of (see [outputs.md](outputs.md)), and the part's checks."),
)

INTRODUCTION = f"""\
# Settings

<!-- Generated from laion_dagster/core/settings.py: do not edit by hand.
     {REGENERATE} -->

One settings model, `laion_dagster/core/settings.py`. Each setting `some_name` can be given as:

- the flag `--some-name` of `run`, `demo`, `up` and `worker` (switches as `--overwrite` and
  `--no-overwrite`; lists comma-separated: `--retry-classes timeout,dns`; maps as
  `--host-map a.test=127.0.0.1`); the commands that only look (`status`, `errors`,
  `reset`, `discover`) take the flags of the settings they read (`--help` lists them);
- a field of the Dagster resource `laion` (the launchpad's config editor lists them all);
- the environment variable `LAION_SOME_NAME` (lists and maps as JSON:
  `LAION_ALLOWED_NETWORKS='["10.20.0.0/16"]'`).

A flag or Dagster config wins over the environment, which wins over the default.

Settings marked *per part* make a part's recipe: they are fixed when the part is enqueued
and stored with it in Redis, and every worker, on any worker host, makes that part's shards
with them, whatever its own environment says. So a format or size chosen in the launchpad for
`enqueued_part` (or on `laion-dagster run`) reaches workers started long before, and one part
never mixes two formats. Enqueuing a part again with other values keeps its recipe and logs the
difference; `laion-dagster reset PART` (or `start_over: true` in the launchpad) starts it over
with the current values. `enqueued_part` shows the recipe in its metadata.
"""


def _default(field: FieldInfo) -> str:
    """The default as a user would write it in the environment, or what unset means."""
    if field.default_factory is not None:
        value = field.default_factory()
        if not isinstance(value, list | dict):
            return "*computed*"  # e.g. the number of cores: see the description
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{'true' if value else 'false'}`"
    if isinstance(value, list | dict):
        return f"`{json.dumps(value)}`"
    if isinstance(value, PurePath):
        value = str(value)
    return f"`{value}`"


def _text(text: str) -> str:
    """Markdown for a table cell: pipes escaped, and `<name>` outside code kept visible (a
    renderer would take `<bucket>` for an HTML tag)."""
    pieces = re.split(r"(`[^`]*`)", " ".join(text.split()))
    out = []
    for piece in pieces:
        if not piece.startswith("`"):
            piece = piece.replace("<", "&lt;").replace(">", "&gt;")
        out.append(piece.replace("|", "\\|"))
    return "".join(out)


def _originals() -> dict[str, list[str]]:
    """Setting name -> the original `setting.py` names it replaces."""
    found: dict[str, list[str]] = {}
    for original, ours in ORIGINAL_NAMES.items():
        name = ours.split(" ")[0]
        if name in Settings.model_fields:
            found.setdefault(name, []).append(original)
    return found


def _description(name: str, field: FieldInfo) -> str:
    text = _text(field.description or "")
    kind = setting_kind(name)
    if typing.get_origin(kind) is typing.Literal:
        text += "; one of " + ", ".join(f"`{choice}`" for choice in typing.get_args(kind))
    if name in RECIPE_FIELDS:
        text += " *(per part)*"
    return text


def _grouped() -> list[tuple[str, str, list[str]]]:
    fields = list(Settings.model_fields)
    starts = {}
    for title, first, _ in GROUPS:
        if first not in Settings.model_fields:
            raise ValueError(f"settings_doc.GROUPS: the group {title!r} starts at {first!r}, "
                             "which is not a setting any more")
        starts[first] = title
    groups: list[tuple[str, str, list[str]]] = []
    intros = {title: intro for title, _, intro in GROUPS}
    for name in fields:
        if name in starts or not groups:
            title = starts.get(name, GROUPS[0][0])
            groups.append((title, intros[title], []))
        groups[-1][2].append(name)
    return groups


def settings_markdown() -> str:
    """docs/settings.md: every setting of the model, grouped, in declaration order."""
    originals = _originals()
    lines = [INTRODUCTION]
    for title, intro, names in _grouped():
        lines += [f"## {title}", "", intro, "",
                  "| setting | environment variable | default | what it does | original |",
                  "|---|---|---|---|---|"]
        for name in names:
            field = Settings.model_fields[name]
            original = ", ".join(f"`{o}`" for o in originals.get(name, []))
            lines.append(f"| `{name}` | `LAION_{name.upper()}` | {_default(field)} | "
                         f"{_description(name, field)} | {original} |")
        lines.append("")
    lines += ["## The original scripts' `setting.py`", "",
              "What became of each setting of the original LAION-5B Redis scripts:", "",
              "| original | ours |", "|---|---|"]
    for original, ours in ORIGINAL_NAMES.items():
        name, _, rest = ours.partition(" ")
        said = f"`{name}` {_text(rest)}" if rest else f"`{name}`"
        lines.append(f"| `{original}` | {said} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(settings_markdown())
