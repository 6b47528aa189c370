"""Run one ``fedmoe`` subcommand from a root script (``run_worker.py`` ...) of a checkout.

Only the standard library is imported up front, so a bare ``python`` that lacks the
dependencies can re-run the script with the checkout's ``.venv`` instead of failing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def run_subcommand(name: str, script: str) -> None:
    """Run ``fedmoe NAME`` with this process's arguments, named after ``script``."""
    try:
        from typer.main import get_command

        from fedmoe.cli import app
    except ImportError:
        venv_python = Path(script).resolve().parent / ".venv" / "bin" / "python"
        if venv_python.exists() and Path(sys.prefix).resolve() != venv_python.parents[1].resolve():
            os.execv(venv_python, [str(venv_python), script, *sys.argv[1:]])
        raise
    command: Any = get_command(app)  # a group: one subcommand per fedmoe command
    command.commands[name].main(args=sys.argv[1:], prog_name=Path(script).name)
