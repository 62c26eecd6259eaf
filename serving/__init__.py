"""The aiohttp serving tier (not built yet)."""
