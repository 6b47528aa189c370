"""``python get_gateway_model.py [flags]`` is ``fedmoe gateway [flags]``.

Prints the gateway model's version, merge method and expert versions, e.g.
``python get_gateway_model.py --coordinator-url http://127.0.0.1:5000``;
``--output DIR`` writes it (or ``--expert NAME``) as a PEFT adapter directory and
``--prompt TEXT`` generates a completion with it.

Works from a checkout without installing the package (see ``fedmoe/entry.py``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedmoe.entry import run_subcommand  # after the sys.path line above

if __name__ == "__main__":
    run_subcommand("gateway", __file__)
