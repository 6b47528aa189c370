"""``python run_coordinator.py [flags]`` is ``fedmoe coordinator [flags]``.

Runs the coordinator (HTTP API v1) in the foreground until Ctrl-C/SIGTERM, e.g.
``python run_coordinator.py --port 5000 --base-model tiny``.

Works from a checkout without installing the package (see ``fedmoe/entry.py``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedmoe.entry import run_subcommand  # after the sys.path line above

if __name__ == "__main__":
    run_subcommand("coordinator", __file__)
