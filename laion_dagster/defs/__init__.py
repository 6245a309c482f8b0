"""The Dagster layer: partitions, assets, sensors, resources and jobs over the core."""
