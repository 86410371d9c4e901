"""``python -m gptjax.experiments <sweep root> <index>``: train one run of a sweep (what a SLURM array task runs)."""

import sys

from gptjax.experiments import run_index
from gptjax.runs import DamagedFile

if __name__ == "__main__":
    if len(sys.argv) != 3 or not sys.argv[2].isdigit():
        print("usage: python -m gptjax.experiments <sweep root> <run index>", file=sys.stderr)
        sys.exit(2)
    try:
        print(run_index(sys.argv[1], int(sys.argv[2])))
    except DamagedFile as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
