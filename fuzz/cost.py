"""CPU cost per input of fuzz targets, in-process (no atheris): the load-independent
figure for making a target faster without making it weaker (reach is printed too).

    python fuzz/cost.py --target hbone-frames --inputs 2000
    python fuzz/cost.py --target hbone-frames --inputs 500 --cprofile 25

Inputs are run.py's random engine (the seeds, then mutations with a fixed seed), so
before/after runs see the same inputs. CPU time is ``time.process_time`` (this process's
user+system seconds), not wall time: it moves little with the machine's load.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz.run import random_inputs  # noqa: E402
from fuzz.targets import TARGETS  # noqa: E402


def measure(name: str, inputs: int, seed: int) -> tuple[float, float]:
    """(CPU microseconds per input, reached share) over ``inputs`` inputs."""
    target = TARGETS[name]
    for data in target.seeds():  # imports and first-use caches out of the figure
        target.run(data)
    batch = list(random_inputs(target, inputs, seed))
    started = time.process_time()
    reached = sum(bool(target.run(data)) for data in batch)
    cpu = time.process_time() - started
    return cpu / len(batch) * 1e6, reached / len(batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", action="append", default=[], choices=sorted(TARGETS))
    parser.add_argument("--inputs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cprofile", type=int, default=0, help="print the top N functions")
    args = parser.parse_args(argv)
    for name in args.target or sorted(TARGETS):
        if args.cprofile:
            profile = cProfile.Profile()
            profile.runcall(measure, name, args.inputs, args.seed)
            pstats.Stats(profile).sort_stats("tottime").print_stats(args.cprofile)
        us, reach = measure(name, args.inputs, args.seed)
        print(
            f"{name:<17} cpu={us:>9.1f} us/input ({1e6 / us:>7.0f}/s of CPU) "
            f"reached={reach:6.1%} inputs={args.inputs}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
