"""The worker: trains one expert on local data and syncs it with the coordinator."""
