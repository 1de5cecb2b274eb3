"""The built-in systems, models and tasks, registered lazily (no torch import here).

Adding a built-in means one line here; third-party packages use the entry-point groups
``eqbench.models`` / ``eqbench.tasks`` instead (see the README).
"""

from __future__ import annotations

from eqbench.registry import MODELS, SYSTEMS, TASKS

#: Registered systems whose reference data ``eqbench data`` (and ``eqbench log-z``) make only when
#: named, e.g. ``eqbench data lj13-single``, ``eqbench data lj55``; without arguments they cover every other registered
#: system (what the test suite and ``make data`` need), and a sweep of a task for any system
#: (``systems = None``) leaves them out unless named. Why: CI runs ``make data`` on a fresh cache
#: within its time limit, these systems' data are not needed by the tests, and lj13-single's cost
#: ~70 % of lj13's chain-steps (measured: 296 s of CPU for its three splits, i.e. ~2.5 min more
#: with --jobs 2 on 2 idle cores), lj55's hours (its protocol's comment); a task that uses them generates them on first use like any other.
SYSTEMS.register("dw2", "eqbench.systems.double_well:make_dw2",
                 description="2 particles, 2-D double-well pair potential (paper §6, Fig. 3b)")
SYSTEMS.register("dw4", "eqbench.systems.double_well:make_dw4",
                 description="4 particles, 2-D double-well pair potential, five metastable minima (paper §6)")
SYSTEMS.register("lj13", "eqbench.systems.lennard_jones:make_lj13",
                 description="13 Lennard-Jones particles in 3-D + CoM oscillator, ordered-pair energy (paper §6)")
SYSTEMS.register("lj13-single", "eqbench.systems.lennard_jones:make_lj13_single",
                 description="LJ-13 with each pair counted once (bgflow; Midgley et al. 2023's energy-only "
                             "training): half lj13's pair energy, same oscillator; not comparable with lj13")
SYSTEMS.register("lj55", "eqbench.systems.lennard_jones:make_lj55",
                 description="55 Lennard-Jones particles in 3-D + CoM oscillator, lj13's ordered-pair convention "
                             "(the LJ-55 of the flow-matching / diffusion lineage); minimum: Mackay icosahedron")
SYSTEMS.register("harmonic", "eqbench.systems.harmonic:make_harmonic",
                 description="known answer: 4 particles in 3-D, u = ½|x|² on the CoM-free subspace (target = prior)")

MODELS.register("kernel-flow", "eqbench.flows.kernel_flow:build",
                description="equivariant RBF kernel CNF, closed-form exact divergence (paper §5, C.1: 620 params)")
MODELS.register("gradient-flow", "eqbench.flows.gradient_flow:build",
                description="simple gradient flow v = ∇Φ, Φ = Σ MLP(RBF(d_ij)) (paper B.1, C.2: 5,377 params; "
                            "settings rbf, sign, preset = paper-code)")
MODELS.register("schnet-flow", "eqbench.flows.schnet_flow:build",
                description="gradient flow of a SchNet-like invariant potential (paper B.1, C.2: 9,857 params; "
                            "settings rbf, encoding_input, encoding_activation, messages, sign, preset = paper-code)")
MODELS.register("node", "eqbench.flows.node:build",
                description="black-box neural ODE on flat coordinates, not equivariant (paper §7.3, C.3: 5,256 / 21,671 params)")
MODELS.register("real-nvp", "eqbench.flows.real_nvp:build",
                description="affine coupling flow with a Gaussian CoM (paper B.2, C.5: 21,576 / 215,680 params), not equivariant")
MODELS.register("en-flow", "eqbench.flows.en_flow:build",
                description="E(n)-equivariant CNF: EGNN velocity (Satorras et al. 2021: 3 layers, 32 features), "
                            "Hutchinson in training, exact brute-force trace in every score")
MODELS.register("se3-acf", "eqbench.flows.augmented_coupling:build",
                description="SE(3) equivariant augmented coupling flow (Midgley et al. 2023): exact joint density, "
                            "marginal log q an IW estimate (K = 20)")
MODELS.register("g-resflow", "eqbench.flows.residual_flow:build",
                description="G-residual flow (Bose et al.): equivariant pair-field blocks with Lipschitz < 1, "
                            "fixed-point inverse, exact log-determinant")
MODELS.register("gaussian", "eqbench.flows.gaussian:build",
                description="isotropic CoM-free Gaussian, closed-form ML fit (1 parameter; baseline)")

TASKS.register("test-nll", "eqbench.tasks.test_nll:TASK",
               description="closed-form ML fit, NLL on train and test (minimal end-to-end task)")
TASKS.register("density-estimation", "eqbench.tasks.density_estimation:TASK",
               description="NLL on train and test vs training-set size 10..10,000, with/without augmentation (paper §7.3, Fig. 5, 8, 9)")
TASKS.register("bg-reweighting", "eqbench.tasks.bg_reweighting:TASK",
               description="ML then λ-mixed KL training; energy histograms, reweighting, ESS, W2, DW-2 free energy (paper §7.4, B.3, Fig. 3b, 6, 10)")
TASKS.register("metastable-states", "eqbench.tasks.metastable_states:TASK",
               description="distinct minima found from flow samples vs training data and MCMC (paper §7.5, Table 1, Fig. 7)")
TASKS.register("divergence-cost", "eqbench.tasks.divergence_cost:TASK",
               description="Hutchinson error and divergence wall time vs number of particles (paper §7.1, Fig. 3a, 3c)")
TASKS.register("dto-vs-otd", "eqbench.tasks.dto_vs_otd:TASK",
               description="test NLL and function evaluations per iteration, DTO vs OTD training (paper §7.2, Fig. 4)")
TASKS.register("evaluate", "eqbench.tasks.evaluate:TASK",
               description="score a flow trained elsewhere (checkpoint, kept cell model, Python object) without training it: NLLs, reweighting, ESS, W2")
TASKS.register("energy-training", "eqbench.tasks.energy_training:TASK", description="training from the energy alone (reverse KL, no data): reverse and forward ESS, reweighting, energy W1/W2 (Midgley et al. 2023)")
TASKS.register("timing", "eqbench.tasks.timing:TASK",
               description="wall time per training and sampling iteration, batch 64, ratios to the kernel flow (paper B.1, Table 2)")
