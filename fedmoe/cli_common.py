"""What every ``fedmoe`` command shares: the consoles, the error exit and the client options."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

from fedmoe.settings_cli import field_option
from fedmoe.worker.options import WorkerOptions

console = Console()
err = Console(stderr=True)

# The client options of `status` and `gateway` are the worker's fields of the same name
# (typer reads these annotations at run time; mypy only needs the value types).
if TYPE_CHECKING:
    UrlOpt = str
    TokenOpt = str | None
    CaOpt = Path | None
else:
    UrlOpt = field_option(WorkerOptions, "coordinator_url")
    TokenOpt = field_option(WorkerOptions, "auth_token")
    CaOpt = field_option(WorkerOptions, "ca_cert")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print an error for humans and exit."""
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)
