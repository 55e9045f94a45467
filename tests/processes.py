"""Helpers for tests that run raysae as a subprocess on the session's Ray cluster."""

from __future__ import annotations

import subprocess
import threading
import time


class Output:
    """A subprocess's merged stdout and stderr, read line by line as it comes, so that a test
    can tell what was printed after a given moment (e.g. after it sent a signal)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.lines = process, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def mark(self) -> int:
        """The number of lines so far: `since(mark)` is what came after this call."""
        return len(self.lines)

    def wait(self, timeout: float) -> int:
        """Wait for the process and its last line; its exit code."""
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def since(self, mark: int = 0) -> str:
        return "".join(self.lines[mark:])

    def ours_since(self, mark: int = 0) -> str:
        """`since(mark)` without the log lines of Ray's own bookkeeping actors (see
        RAY_INTERNAL_ACTORS): what raysae, its Train workers and Tune printed."""
        return "".join(line for line in self.lines[mark:] if not _ray_internal(line))


RAY_INTERNAL_ACTORS = ("PlacementGroupCleaner",)
"""Ray Train's actors whose tracebacks are Ray's business, not raysae's: the placement-group
cleaner looks its controller up through the state API at address "auto", which fails with
"Found multiple active Ray instances" whenever another Ray runs on the same machine (another
test session, or the submit drill's head)."""


def _ray_internal(line: str) -> bool:
    return any(f"({name} pid=" in line for name in RAY_INTERNAL_ACTORS)


def wait_for_idle_cpus(timeout: float = 60) -> None:
    """Wait until the session cluster has every CPU free again (no Ray workers left behind)."""
    import ray

    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] - 1e-6:
        assert time.time() < deadline, f"CPUs still held: {ray.available_resources()}"
        time.sleep(0.5)
