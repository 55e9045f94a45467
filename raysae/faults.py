"""Fault injection for tests: hooks a test installs into the training loop (`on_step`).

`raysae.train.train_distributed(..., on_step=DieOnce(35_000))` makes the last Ray Train worker
exit abruptly, once, after 35,000 tokens, so a test can check that the run resumes from its
checkpoint with exact token accounting. Nothing here runs unless a test installs it.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from raysae.loop import StepInfo

AFTER_CHECKPOINT_S = 5.0
"""By default a fault waits this long after a checkpoint: Ray registers a checkpoint when it next
polls the workers, so a crash right after `report` leaves the newest checkpoint unregistered
(the restart still resumes from it: raysae.worker._restore_point)."""


@dataclass(frozen=True)
class DieOnce:
    """The last rank calls os._exit(1) once the run is past `at_tokens` and has a checkpoint
    `after_checkpoint_s` old."""

    at_tokens: int
    """Tokens after which the worker dies."""
    after_checkpoint_s: float = AFTER_CHECKPOINT_S
    """How long after the newest checkpoint (0: at the first step after it)."""
    marker: str = field(
        default_factory=lambda: str(
            Path(tempfile.gettempdir()) / f"raysae-fault-{uuid.uuid4().hex}"
        )
    )
    """A file new to this hook: written when the fault fires, so it fires once per run (the
    restarted workers get the same hook)."""

    def __call__(self, step: StepInfo) -> None:
        if step.tokens < self.at_tokens or step.checkpoint_time is None:
            return
        if os.path.exists(self.marker):
            return
        elapsed = time.perf_counter() - step.checkpoint_time
        time.sleep(max(0.0, self.after_checkpoint_s - elapsed))
        if step.rank == step.world_size - 1:
            Path(self.marker).write_text(str(step.tokens))
            os._exit(1)


@dataclass(frozen=True)
class MarkWhenSpread:
    """Writes `marker` once the run has `world_size` workers and a checkpoint registered for
    AFTER_CHECKPOINT_S: from then on, losing a node restarts from that checkpoint. A test
    waits for the file before it removes a node (an elastic run may start smaller and grow)."""

    world_size: int
    """Workers the run must have."""
    marker: str = field(
        default_factory=lambda: str(
            Path(tempfile.gettempdir()) / f"raysae-spread-{uuid.uuid4().hex}"
        )
    )
    """The file written, with the tokens trained when it was."""

    def __call__(self, step: StepInfo) -> None:
        if step.world_size < self.world_size or step.checkpoint_time is None:
            return
        if time.perf_counter() - step.checkpoint_time < AFTER_CHECKPOINT_S:
            return
        if step.rank == 0 and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(step.tokens))
