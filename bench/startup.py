"""How long `raysae --help` and `raysae <command> --help` take to print, in fresh interpreters.

    python bench/startup.py [--repeats 9] [--tree PATH ...]

Each command is run `--repeats` times, alternating commands (and trees) so that no case gets a
warmer disk cache; the table gives the median and the range in seconds, and the load average
before and after. `--tree` times checkouts of raysae (default this one; for example an older
commit too, made with `git worktree add --detach /tmp/before <commit>`), each imported from
its own folder through PYTHONPATH, with this interpreter and its installed dependencies.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = ([], ["train"], ["sweep"], ["eval"], ["harvest"])


def time_once(args: list[str], tree: str) -> float:
    env = {**os.environ, "PYTHONPATH": tree}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "raysae", *args, "--help"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=tree,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tree", action="append", help="a raysae checkout (repeatable)")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [os.path.abspath(t) for t in args.tree or [here]]
    print(f"load average before: {os.getloadavg()}")
    times = {(t, " ".join(c) or "(none)"): [] for t in trees for c in COMMANDS}
    for _ in range(args.repeats):
        for command in COMMANDS:
            for tree in trees:
                times[tree, " ".join(command) or "(none)"].append(time_once(list(command), tree))
    print("| tree | raysae ... --help | median s | min–max s |")
    print("|---|---|---|---|")
    for (tree, name), ts in times.items():
        print(f"| {tree} | {name} | {statistics.median(ts):.2f} | {min(ts):.2f}–{max(ts):.2f} |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
