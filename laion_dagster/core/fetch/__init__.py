"""Fetching a URL: the aiohttp fetcher, its address guard, name resolution, and the memory
of servers that failed."""
