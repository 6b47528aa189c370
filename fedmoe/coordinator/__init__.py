"""The coordinator: experts, gateway, update ledger and durable state (no HTTP here)."""
