"""The benchmark of docs/benchmarks.md: ``sdo bench`` (see ``sdo.cli.bench``) with its results written to
benchmarks/results/strategy_cost/ unless ``--output`` is given. Every ``sdo bench`` flag applies, e.g.

    python benchmarks/strategy_cost.py                      # digits UNet, N=50, sweep 10..200, batch 4
    python benchmarks/strategy_cost.py --quick --output /tmp/bench-smoke
    python benchmarks/strategy_cost.py --model sd15_unet.json --device cuda --batch 1 --no-memory
"""

import sys
from pathlib import Path

from sdo.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--output" not in args:
        args += ["--output", str(Path(__file__).resolve().parent / "results" / "strategy_cost")]
    sys.exit(main(["bench", *args]))
