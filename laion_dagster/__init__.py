"""laion-dagster: download LAION-scale image-text datasets with Dagster, Redis and workers."""

__version__ = "0.2.0"
