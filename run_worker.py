"""``python run_worker.py [flags]`` is ``fedmoe worker [flags]``.

Runs one worker in the foreground (Ctrl-C: one final upload, then exit), e.g.
``python run_worker.py --coordinator-url http://127.0.0.1:5000 --worker-id Worker-1-Python
--specialty python_expert --dataset data.jsonl --sync-interval 10.0``.

Works from a checkout without installing the package (see ``fedmoe/entry.py``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedmoe.entry import run_subcommand  # after the sys.path line above

if __name__ == "__main__":
    run_subcommand("worker", __file__)
