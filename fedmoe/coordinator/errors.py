"""Domain errors of the coordinator; the API layer maps them to HTTP status codes."""


class CoordinatorError(Exception):
    """Base class; ``str(error)`` is a message fit for the client."""


class UnknownExpertError(CoordinatorError):
    """No expert of that name exists (HTTP 404)."""


class UnknownWorkerError(CoordinatorError):
    """The worker has not registered (HTTP 409; the worker re-registers)."""


class IncompatibleWorkerError(CoordinatorError):
    """The worker's base model or LoRA shape differs from the coordinator's (HTTP 409)."""


class InvalidUpdateError(CoordinatorError):
    """The update is malformed or inconsistent (HTTP 400/422)."""


class StaleUpdateError(CoordinatorError):
    """The update's staleness exceeds the bound (HTTP 409)."""


class RejectedUpdateError(CoordinatorError):
    """The update was refused by policy, e.g. its norm is over the bound (HTTP 422)."""


class DuplicateUpdateIdError(CoordinatorError):
    """The update id was already used by another worker or expert (HTTP 409)."""


class ForbiddenError(CoordinatorError):
    """The caller may not act as that worker (HTTP 403)."""


class StateDirError(CoordinatorError):
    """The state directory belongs to an incompatible configuration."""


class TooManyWorkersError(CoordinatorError):
    """The coordinator already has ``max_workers`` registered workers (HTTP 429)."""


class ExpertUnavailableError(CoordinatorError):
    """The expert takes no updates until the coordinator restarts (HTTP 503)."""
