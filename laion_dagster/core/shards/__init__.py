"""A shard: its samples' records, its recipe, and its files (written whole or not at all)."""
