"""Run a module under cProfile timed by this process's CPU clock, not the wall clock.

``python bench/cprofile_cpu.py OUT.prof -m package.module [args...]``

``python -m cProfile`` times with ``perf_counter``: on a shared machine a function that
was preempted is charged the time other processes ran, and a wait in ``epoll`` counts as
its full sleep. ``time.process_time`` charges only CPU this process used (at the cost of
a clock syscall per event, so the overhead is higher; read shares, not absolute times).
The stats are written when the module returns or raises (SIGTERM handling included).
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "-m":
        print(__doc__, file=sys.stderr)
        return 2
    out, module = argv[0], argv[2]
    sys.argv = [module, *argv[3:]]
    profile = cProfile.Profile(time.process_time)
    try:
        profile.runcall(runpy.run_module, module, run_name="__main__", alter_sys=True)
    finally:
        profile.dump_stats(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
