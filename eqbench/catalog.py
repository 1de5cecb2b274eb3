"""The built-in systems, models and tasks, registered lazily (no torch import here).

Adding a built-in means one line here; third-party packages use the entry-point groups
``eqbench.models`` / ``eqbench.tasks`` instead (see the README).
"""

from __future__ import annotations

from eqbench.registry import MODELS, SYSTEMS, TASKS

SYSTEMS.register("dw2", "eqbench.systems.double_well:make_dw2",
                 description="2 particles, 2-D double-well pair potential (paper §6, Fig. 3b)")
SYSTEMS.register("dw4", "eqbench.systems.double_well:make_dw4",
                 description="4 particles, 2-D double-well pair potential, five metastable minima (paper §6)")
SYSTEMS.register("lj13", "eqbench.systems.lennard_jones:make_lj13",
                 description="13 Lennard-Jones particles in 3-D + CoM oscillator, ordered-pair energy (paper §6)")

MODELS.register("gaussian", "eqbench.flows.gaussian:build",
                description="isotropic CoM-free Gaussian, closed-form ML fit (1 parameter; baseline)")

TASKS.register("test-nll", "eqbench.tasks.test_nll:TASK",
               description="closed-form ML fit, NLL on train and test (minimal end-to-end task)")
