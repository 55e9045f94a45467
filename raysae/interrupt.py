"""Ctrl-C (SIGINT) and SIGTERM: a command stops cleanly, exits 128 + the signal's number
(130, 143) and says how to resume (raysae/__main__.py prints it).

The stopping itself is Ray's, not ours:
- Ray Train (`TorchTrainer.fit` in the main thread) installs its own SIGINT handler, which
  aborts the run's controller and worker group and then ends the driver with SystemExit.
  `ray_train_stops` turns that SystemExit into `Interrupted`, and forwards SIGTERM to it.
- Ray Tune (`Tuner.fit`) stops on SIGUSR1 (and on SIGINT unless TUNE_DISABLE_SIGINT_HANDLER=1):
  it ends its trials, and with them their Train workers, saves the experiment state one last
  time and returns as if the sweep were done. `tune_stops` keeps SIGINT here, so that the
  command knows it was interrupted, and asks Tune to stop through SIGUSR1.
`ray.init` installs Ray's own SIGTERM handler in the driver (a bare exit, and a crash handler in
its core worker that aborts the process), so `reclaim` takes SIGTERM back after it; the two
contexts above do so on entry too. Outside those, the first signal raises `Interrupted` where
the main thread is. A second signal while Ray winds down raises it at once (Ray's own "press
Ctrl-C again to skip").
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from typing import Optional
from unittest import mock

SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals that stop a run cleanly."""


class Interrupted(BaseException):
    """The command was stopped by `signum`. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way up mistakes it for an error."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.resume_args: list[str] = []  # added to the command line to go on (set by the command)
        self.cannot_resume = ""  # why the run cannot go on from where it stopped, if it cannot

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal's number (SIGINT 130, SIGTERM 143)."""
        return 128 + self.signum


_active = False
"""Whether `handle_signals` is open."""
_received: Optional[int] = None
"""The first signal received since `handle_signals` began, else None."""
_graceful: Optional[Callable[[int], None]] = None
"""What asks the running Ray call to stop, while one runs (see the module docstring)."""


def received() -> Optional[int]:
    """The first stop signal this command received, or None."""
    return _received


def _handler(signum: int, frame) -> None:
    global _received
    first = _received is None
    if first:
        _received = signum
    if first and _graceful is not None:
        _graceful(signum)  # Ray winds the run down and returns (or raises) in the main thread
        return
    raise Interrupted(_received)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stop the command (see the module docstring) while this is open."""
    global _active, _received
    _active, _received = True, None
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        _active = False
        for s, handler in previous.items():
            signal.signal(s, handler)


def reclaim() -> None:
    """Put this module's handlers back after `ray.init` replaced Ray's (see the module docstring)."""
    if _active:
        for s in SIGNALS:
            signal.signal(s, _handler)


@contextlib.contextmanager
def _stopping_with(stop: Callable[[int], None]) -> Iterator[None]:
    global _graceful
    outer, _graceful = _graceful, stop
    try:
        yield
    finally:
        _graceful = outer


@contextlib.contextmanager
def ray_train_stops() -> Iterator[None]:
    """Around `TorchTrainer.fit()`: Ray Train's SIGINT handler aborts the run (SIGTERM is
    forwarded to it); its SystemExit becomes `Interrupted`."""
    reclaim()
    ours = signal.getsignal(signal.SIGINT)

    def forward(signum: int) -> None:
        ray_handler = signal.getsignal(signal.SIGINT)
        if ray_handler is ours or not callable(ray_handler):  # fit has not installed it yet
            raise Interrupted(signum)
        ray_handler(signal.SIGINT, None)

    try:
        with _stopping_with(forward):
            yield
    except SystemExit:  # only Ray Train's SIGINT handler ends the driver this way
        raise Interrupted(_received or signal.SIGINT) from None
    finally:
        signal.signal(signal.SIGINT, ours)  # Ray leaves its handler installed after fit


@contextlib.contextmanager
def tune_stops() -> Iterator[None]:
    """Around `Tuner.fit()`: SIGINT stays with `handle_signals`; the first SIGINT or SIGTERM
    asks Tune to stop through SIGUSR1; `Interrupted` is raised once Tune has returned."""
    if not _active:  # called from Python, not the command line: Tune's own SIGINT handling
        yield
        return
    reclaim()
    before = signal.getsignal(signal.SIGUSR1)

    def ask_tune(signum: int) -> None:
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if tune_handler is before or not callable(tune_handler):  # Tune has not begun
            raise Interrupted(signum)
        tune_handler(signal.SIGUSR1, None)

    # Tune reads TUNE_DISABLE_SIGINT_HANDLER when the run starts; patch.dict restores it after.
    no_tune_sigint = mock.patch.dict(os.environ, {"TUNE_DISABLE_SIGINT_HANDLER": "1"})
    with _stopping_with(ask_tune), no_tune_sigint:
        yield
    if _received is not None:
        raise Interrupted(_received)
