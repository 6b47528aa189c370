"""``python -m fedmoe`` runs the CLI."""

from fedmoe.cli import main

main()
