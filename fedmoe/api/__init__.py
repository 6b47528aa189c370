"""The coordinator's HTTP API v1 (FastAPI); the only layer that speaks HTTP errors."""
