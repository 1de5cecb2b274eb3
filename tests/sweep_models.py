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


def sleepy_cell(system, config=None):
    """Passes the model check (its first build in a process), then takes far longer than any
    test's time limit in the cell itself (every later build)."""
    global _BUILDS
    _BUILDS += 1
    if _BUILDS > 1:
        time.sleep(60)
    return build_gaussian(system, config)


_BUILDS = 0


def stubborn(system, config=None):
    """Keeps SIGALRM out, as a long call into a C extension does: only the parent can stop it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(60)
    return build_gaussian(system, config)


def lazy_import(system, config=None):
    """Imports a package on first use, as torch imports sympy: a time limit that fires during
    that import leaves it half-initialised in the process (``tests/poison_pkg``)."""
    import poison_pkg

    assert poison_pkg.core.VALUE == 1
    return build_gaussian(system, config)
