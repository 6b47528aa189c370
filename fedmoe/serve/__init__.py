"""``fedmoe serve``: the experts and the gateway behind an OpenAI-compatible HTTP API."""
