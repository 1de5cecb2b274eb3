"""A package whose first import in a test is slow (``EQBENCH_TEST_SLOW_IMPORT_FLAG``: a file made
by that import), for the time-limit tests. Like sympy's, its ``__init__`` imports names from a
submodule: interrupted after that, it leaves ``poison_pkg.core`` in ``sys.modules``, and the
next ``import poison_pkg`` in the process gives a package without the attribute ``core``."""

import os
import time

from .core import VALUE  # noqa: F401

_FLAG = os.environ.get("EQBENCH_TEST_SLOW_IMPORT_FLAG")
if _FLAG and not os.path.exists(_FLAG):
    open(_FLAG, "w").close()
    time.sleep(30)
