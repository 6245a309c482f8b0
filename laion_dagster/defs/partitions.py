"""One dynamic partition per part (an input file of any format we read), keyed as
core/input/parts.py names it (`Part.key`): `<subset>/<number>` for Spark's
`part-<number>-<uuid>-c000` files (`laion2B-en/00042`), else `<subset>/<stem>` (`cc3m/train-0`).

Dynamic rather than static because parts appear as files land in the parts folder
(`parquet_dir`); the `discover_parts` sensor (or `laion-dagster discover` / `run`) adds them.
"""

from dagster import DynamicPartitionsDefinition

PARTS = "parts"
parts_partitions = DynamicPartitionsDefinition(name=PARTS)
