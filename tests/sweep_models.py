"""Model builders that misbehave on purpose, for the sweep robustness tests (``module:attr`` paths)."""

from __future__ import annotations

import os
import signal
import time

from eqbench.flows.gaussian import build as build_gaussian


def sleepy(system, config=None):
    """Takes far longer than any test's time limit before building."""
    time.sleep(60)
    return build_gaussian(system, config)


def killed(system, config=None):
    """The worker dies as if the kernel's OOM killer had struck (SIGKILL: no Python cleanup)."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)
    return build_gaussian(system, config)
