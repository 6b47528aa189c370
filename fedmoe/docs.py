"""Write the ``fedmoe coordinator`` and ``fedmoe worker`` option tables into README.md.

The tables are rendered from the commands ``--help`` describes, which are generated from
the settings fields, so a new field needs nothing here. ``python -m fedmoe.docs``
rewrites README.md between the ``<!-- options:NAME -->`` markers; ``--check`` only says
whether it is up to date (exit status 1 when not).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import fedmoe.cli  # noqa: F401  (builds the commands, which fills OPTION_DOCS)
from fedmoe.settings_cli import OPTION_DOCS, OptionDoc

COMMANDS = ("coordinator", "worker")
README = Path(__file__).resolve().parent.parent / "README.md"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _default(option: OptionDoc) -> str:
    if option.required:
        return "required"
    return "" if option.default is None else f"`{_cell(option.default)}`"


def option_table(name: str) -> str:
    """The Markdown table of one command's options: flag, variable, default, meaning."""
    lines = ["| flag | variable | default | meaning |", "|---|---|---|---|"]
    for option in OPTION_DOCS[name]:
        meaning = _cell(option.help)
        if option.choices:
            meaning += " One of " + ", ".join(f"`{c}`" for c in option.choices) + "."
        env = f"`{option.env}`" if option.env else ""
        lines.append(f"| `{option.flag}` | {env} | {_default(option)} | {meaning} |")
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """``text`` with each command's table replaced between its markers."""
    for name in COMMANDS:
        pattern = re.compile(
            rf"(<!-- options:{name} -->\n).*?(<!-- /options:{name} -->)", flags=re.DOTALL
        )
        if not pattern.search(text):
            raise ValueError(f"README has no <!-- options:{name} --> ... markers")
        match = pattern.search(text)
        assert match is not None
        text = text[: match.end(1)] + option_table(name) + text[match.start(2) :]
    return text


def main(argv: list[str]) -> int:
    """Rewrite README.md (or with ``--check``, report whether it is up to date)."""
    text = README.read_text(encoding="utf-8")
    fresh = render(text)
    if "--check" in argv:
        if fresh != text:
            print("README.md option tables are out of date: run python -m fedmoe.docs")
            return 1
        return 0
    README.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
