"""The queue: its protocol on Redis, robust clients, and the embedded server."""
