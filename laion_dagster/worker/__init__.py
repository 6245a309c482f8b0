"""The worker pool: a supervisor and its fetching processes."""
