"""The pure core: parts, queue protocol, fetching, images, shards, accounting. No Dagster here."""
