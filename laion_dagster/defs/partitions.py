"""One dynamic partition per parquet part, keyed `<subset>__<part stem>`.

Dynamic rather than static because parts appear as files land in the parquet folder; the
`discover_parts` sensor (or `laion-dagster discover` / `run`) adds them.
"""

from dagster import DynamicPartitionsDefinition

PARTS = "parts"
parts_partitions = DynamicPartitionsDefinition(name=PARTS)
