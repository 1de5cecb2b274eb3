"""``metastable-states``: how many distinct metastable states a sampler reaches (paper §7.5,
Table 1, Fig. 7; SPEC §5).

A metastable state is the set of configurations that minimise to the same local minimum. Every
configuration a method produces is minimised (L-BFGS, no momentum: :func:`eqbench.minima.minimize`);
unconverged runs and saddle points (a negative Hessian eigenvalue once the rotation and
translation zero modes are projected out) are dropped and counted; the minima left are equated
when their sorted pairwise-distance vectors lie within ``eps`` (single linkage,
:func:`eqbench.minima.distinct_minima`), which makes every count a lower bound (§7.5). Counts
are reported per energy bin, and again at ``eps/2`` and ``2 eps`` (SPEC §5) so a reader sees
whether the threshold matters.

**Methods** (the ``variant`` grid axis, one cell each; records carry it in ``variant`` and the
round in ``step``):

- ``flow``: the model is trained on the training set, then each of ``rounds`` rounds draws
  ``n_samples`` configurations from it (one training per cell, independent sampling rounds:
  Table 1's training row has no spread, so its rounds shared one training set). Only positions
  are needed, so continuous flows integrate the velocity alone (``Flow.sample_positions``),
  without any trace.
- ``training``: the training set itself, counted once (step 0).
- ``mcmc-short``: "an independent equilibrium MCMC trajectory having the same amount of samples
  as the training set" (§7.5): ``mcmc_short_samples`` samples per round, independent of the
  training set (see the sampling protocols). It answers: does sampling the model beat simply
  running the sampler that made the training data once more?
- ``mcmc-long``: ``mcmc_long_samples`` fresh Metropolis samples per round (100,000 in the paper,
  "100x more evaluations" than the short one); every ``long_minimise_every``-th of them is
  minimised (1: all).

**Sampling protocols** (``sampling_protocol``, a grid axis; a per-system table may list several,
``{dw4 = "eqbench", lj13 = ["eqbench", "paper"]}``, as the quick, paper and calibrate profiles do):
how the LJ-13 training set and the short and long MCMC references are sampled. The two are
different settings keys, so their counts are never pooled.

- ``"eqbench"``: decorrelated samples of many chains (SPEC §3). The training set is ``n_train``
  rows of the stored training split (many chains after burn-in, thinned beyond the
  autocorrelation time; seeded by the cell seed); the short reference is, per round, its own
  ``mcmc_short_samples`` rows of the stored test split (disjoint chains, another seed; disjoint
  slices of one seeded permutation while the split is large enough, independent seeded subsets
  beyond); the long reference is a fresh run of ``mcmc_chains`` chains, ``mcmc_burn_in`` steps,
  stride ``mcmc_stride`` (``"protocol"``: the system's data protocol), its samples taken
  step-major so a prefix spreads over all chains. Each sample is worth a decorrelated one, so
  1,000 samples reach far more minima than a 1,000-step trajectory (223 for the LJ-13 training
  set against the paper's 7), at a price: every stored LJ-13 row cost its chain a stride of
  4,000 steps, and the 200 chains of a split ran 65,000 burn-in steps each.
- ``"paper"``: §7.5 as written. The LJ-13 training set is "a short equilibrium MCMC trajectory
  consisting of 1,000 samples": ``n_train`` *consecutive* states of one Metropolis chain (the
  system's protocol step size, 0.025 for LJ-13; CoM removed after every step) after
  ``mcmc_burn_in`` discarded steps; every step is a sample, so a rejected move repeats the row
  and each sample costs one energy evaluation. The short reference is, per round, an
  independent trajectory of ``mcmc_short_samples`` consecutive states, the long reference one of
  ``mcmc_long_samples`` (``mcmc_chains`` and ``mcmc_stride`` are not used: one chain, stride 1).
  Each trajectory has its own burn-in of ``mcmc_burn_in`` steps (``"protocol"``: the system's).
  The DW-4 training set (``training_set = "minimum"``) is the same under both protocols: the
  paper's DW-4 experiment is not a trajectory.

Metropolis seeds (:func:`mcmc_seed`) are ``base + 1,000 seed + round``: base 10,000 for the
eqbench long reference (its scheme so far), 1, 2 and 3 million for the paper protocol's
training, short and long trajectories; rounds < 1,000 and seeds < 990 keep them distinct from
each other and from the data splits' seeds (1-3).

**Energy evaluations** (target energy evaluations, one per Metropolis step or per energy of a
flow sample): every method records ``energy_evaluations`` (what its samples cost) and, apart,
``energy_evaluations_burn_in`` (discarded steps plus the energy of each chain's start). MCMC
methods record them per round: a paper trajectory ``n`` and ``mcmc_burn_in + 1``; the eqbench
long reference ``chains x samples per chain x stride`` and ``chains x (mcmc_burn_in + 1)``; rows
of a stored split ``n x stride`` and ``min(n, chains of the split) x (burn-in + 1)``
(:func:`split_cost`: a random subset of a split comes from nearly all its chains). The training
set records what it cost (for ``"minimum"``: the 1,000 split rows searched for the minimum).
The flow records its own: maximum likelihood evaluates no energy; a λ-mix step with λ > 0
evaluates ``kl_batch_size`` energies (with their gradient, by autograd); and what its training
data cost as ``energy_evaluations_training_data[_burn_in]``. Minimisation is the measurement,
the same for every method, and is not counted. So in LJ-13 quick runs, the paper protocol's
short reference and the flow's training data cost 1,000 evaluations (plus burn-in), as in
§7.5; eqbench's short reference costs 4,000,000 plus 13,000,200 of burn-in.

The three references do not depend on the model (:meth:`MetastableStates.reference_params`):
they are planned under model ``"reference"`` (:data:`eqbench.tasks.base.REFERENCE_MODEL`) with
only the settings they use (:data:`REFERENCE_SETTINGS`; not the flow's training, sampling and
``model_config``), so they run once per system, settings and seed and every model's run or
sweep shares them; their records carry ``model = "reference"``.

**Training** (``training_set``): ``"mcmc"`` (LJ-13, §7.5): the training set of the sampling
protocol, maximum-likelihood training (paper C: λ = 0 unless stated). ``"minimum"`` (DW-4, §7.5):
one minimum, ``train_minimum`` = its rank by energy (0 = global) among the distinct minima
reached from 1,000 training-split samples, repeated ``n_train`` times with isotropic Gaussian
noise of scale ``train_noise`` (CoM removed); trained by ML for ``ml_iterations`` then with
``(1-λ) ML + λ KL``, ``λ = mix_lambda`` (0.5), for ``mix_iterations`` (paper C: "a combination of
ML-training and KL-training with λ = 0.5 after pretraining"). For DW-4 all minima count in one
bin; the paper reports that the equivariant flow finds all five and the non-equivariant one only
the training minimum (Fig. 7a).

**Minimiser and clustering** (``minima_protocol``): ``"eqbench"`` (the default) is the L-BFGS and
single linkage on the Euclidean norm described above; ``"paper-code"`` is what the authors' code
for §7.5 does (en_flows ``deprecated/eqnode/minima.py``): gradient descent with fixed steps
``gd_step`` (1e-3 there) for at most ``gd_max_steps``, the L1 norm with threshold ``eps_l1``, and
each minimum joining the first representative within it (order-dependent). ``minimizer``,
``cluster_norm``, ``cluster_rule`` override the preset one by one (``"preset"`` takes it);
``max_displacement`` caps an L-BFGS step per particle (0.3 by default, a third of a neighbour
distance on LJ-13, enough to cross a saddle; a smaller cap such as 0.05 keeps steps well inside
a basin at the cost of more steps). The choice matters on LJ-13: from 400 training samples,
L-BFGS (cap 0.3) and gradient descent (step 1e-3) end in different minima for 78, L-BFGS with
cap 0.05 and gradient descent for 96 (a smaller cap does not make L-BFGS follow the descent
path; its direction differs), while gradient descent with steps 1e-3 and 2.5e-4 differ for 1.

**ε** (``eps``, per system): copies of one minimum agree to ~1e-7 in the signature norm at the
minimiser's ``gtol = 1e-6``, while the closest distinct minima measured here lie 0.55 apart for
DW-4 (its five minima) and 0.020 apart for LJ-13 (0.022 among the 223 minima of 1,000 training
samples, 0.0197 among the ~560 of 10,000 MCMC samples). Defaults
0.01 (DW-4) and 0.001 (LJ-13) sit inside these gaps with a factor >= 10 to spare at ``eps/2``
and ``2 eps``; ``closest_distinct_separation`` records the margin of every round.

Settings accept a table keyed by system name (``eps = {dw4 = 0.01, lj13 = 0.001}``) or a plain
value for every system (``--set eps=0.005``).

**Report**: beside the usual tables, a Table-1 table per system, profile and comparison (a flow
and the reference cells sharing every reference setting): each method's distinct minima per
energy bin (mean ± std over seeds x rounds), its energy evaluations and its sampling protocol,
the ordering of flow, short and long MCMC per bin, and Table 1's rows and ordering beside.

Records (``variant`` = method, ``step`` = round): ``distinct_minima`` and
``distinct_minima_<bin>`` (bins named like ``m80_m70`` for [-80, -70), ``minf_m80`` for
(-inf, -80)), the same with ``_eps_half`` / ``_eps_double``, ``new_minima[_<bin>]`` (minima the
training set never reached: the question of §7.5) and ``new_minima_sample_fraction`` (the share
of the round's minima, repeats included, that lie in those: a flow collapsed onto its training
minimum may still put a few of 10,000 samples elsewhere), ``n_samples``, ``n_nonfinite``,
``n_unconverged``, ``n_saddles``, ``n_minima``, ``lowest_minimum_energy``,
``closest_distinct_separation``, ``energy_evaluations[_burn_in]`` (see above), for trajectories
``mcmc_acceptance`` and ``trajectory_wall_s``; per cell ``eps``, wall times, and the lowest distinct minima
per bin over all rounds for the structure plot (``structure_energy`` at ``step = slot``,
``structure_x/_y/_z`` at ``step = slot * n_particles + particle``).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.errors import ConfigError
from eqbench.records import Record
from eqbench.tasks.base import REFERENCE_MODEL, CellContext, Task
from eqbench.tasks.common import guard_records, sample_positions, show_progress, train_flow, training_options

from eqbench.tasks.reporting import (
    NOT_MEASURED,
    NOT_REPRODUCED,
    REPRODUCED,
    Claim,
    ClaimResult,
    HtmlTable,
    TaskSection,
    describe,
    fmt,
    has_capability,
    point,
    seed_stats,
    settings_name,
    short_name,
)

if TYPE_CHECKING:
    import pandas
    import torch

    from eqbench.flows.base import Flow
    from eqbench.minima import MinimaCensus

__all__ = ["MetastableStates", "REFERENCE_SETTINGS", "SAMPLING_PROTOCOLS", "TASK", "VARIANTS", "TRAINING_SETS",
           "bin_label", "mcmc_seed", "parse_bin_label"]

#: Methods whose minima are counted: the values of the ``variant`` grid axis.
VARIANTS: tuple[str, ...] = ("flow", "training", "mcmc-short", "mcmc-long")
#: The settings the reference methods (every variant but ``flow``) use: a reference cell is planned
#: with these only, so that it is the same cell whichever model asked for it.
REFERENCE_SETTINGS: frozenset[str] = frozenset({
    "variant", "rounds", "training_set", "n_train", "train_minimum", "train_noise", "mcmc_short_samples",
    "mcmc_long_samples", "mcmc_chains", "mcmc_burn_in", "mcmc_stride", "sampling_protocol", "long_minimise_every", "eps", "gtol", "max_steps", "energy_bins",
    "structures_per_bin", "minima_protocol", "minimizer", "max_displacement", "gd_step", "gd_max_steps", "cluster_norm",
    "cluster_rule", "eps_l1"})
#: Settings only the ``flow`` method reads (besides the training settings of
#: :data:`eqbench.config.TRAINING_DEFAULTS`), with the value a reference cell, planned without
#: them, resolves them to; it never uses them.
_FLOW_ONLY: dict[str, Any] = {"n_samples": 1, "ml_iterations": 0, "mix_iterations": 0, "mix_lambda": 0.0,
                              "batch_size": 1, "model_config": {}}
#: Settings added after cells were first stored, with the value those cells used: a stored cell
#: without them (priced by the calibrate profile, read by the report) means this.
_LATER_SETTINGS: dict[str, Any] = {"sampling_protocol": "eqbench", "long_minimise_every": 1}
#: How the training set is made (see the module docstring).
TRAINING_SETS: tuple[str, ...] = ("minimum", "mcmc")
#: ``sampling_protocol``: how the MCMC training set and the short and long MCMC references are
#: sampled. ``"eqbench"``: decorrelated samples of many chains (the stored data splits, SPEC §3;
#: the long reference a fresh many-chain run). ``"paper"``: §7.5 as written: each is *one*
#: Metropolis trajectory of consecutive steps (every step a sample, one energy evaluation each).
SAMPLING_PROTOCOLS: tuple[str, ...] = ("eqbench", "paper")
#: Metropolis seeds (:func:`mcmc_seed`): ``base + 1_000 * seed + round``. ``eqbench-long`` is the
#: scheme the long reference always had; the data splits use seeds 1-3 (SPEC §3).
_SEED_BASES: dict[str, int] = {"eqbench-long": 10_000, "paper-training": 1_000_000, "paper-short": 2_000_000,
                               "paper-long": 3_000_000}
#: Rounds and seeds stay below these so that no two Metropolis seeds coincide.
_MAX_ROUNDS = 1_000
_MAX_SEED = 990
#: Axis names of the coordinate records of the structure plot.
AXES: tuple[str, ...] = ("x", "y", "z")

_PROTOCOL = "protocol"
#: ``minima_protocol`` presets: the minimiser and clustering each names. ``"eqbench"`` is L-BFGS and
#: single linkage on the Euclidean norm (:mod:`eqbench.minima`); ``"paper-code"`` is the authors'
#: code for §7.5 (en_flows ``deprecated/eqnode/minima.py``): fixed-step gradient descent, L1 norm,
#: first representative within ε. ``minimizer``, ``cluster_norm`` and ``cluster_rule`` set to
#: ``"preset"`` take the preset's value; any other valid value overrides it.
MINIMA_PROTOCOLS: dict[str, dict[str, str]] = {
    "eqbench": {"minimizer": "lbfgs", "cluster_norm": "l2", "cluster_rule": "single-linkage"},
    "paper-code": {"minimizer": "gradient-descent", "cluster_norm": "l1", "cluster_rule": "first-representative"},
}
_PRESET = "preset"
#: ``record(metric, value, unit="", step=None)``: appends one record of the running cell.
RecordFn = Callable[..., None]
#: Rows of the training split minimised to find the training minimum of ``training_set = "minimum"``.
_MINIMUM_SEARCH_SAMPLES = 1000


# -- settings ---------------------------------------------------------------------------------


def _for_system(params: Mapping[str, Any], key: str, system: str) -> Any:
    """``params[key]``, or its entry for ``system`` when it is a table keyed by system names."""
    if key not in params:
        raise ConfigError(f"task metastable-states needs the setting {key!r}")
    value = params[key]
    if isinstance(value, Mapping):
        if system not in value:
            raise ConfigError(
                f"setting {key} gives no value for system {system!r}; it has {', '.join(sorted(value)) or 'none'}"
            )
        return value[system]
    return value


def _int(value: Any, key: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _positive_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < float(value) < math.inf:
        raise ConfigError(f"{key} must be a positive number, got {value!r}")
    return float(value)


def _protocol_int(value: Any, key: str, default: int, minimum: int) -> int:
    return default if value == _PROTOCOL else _int(value, f"{key} (or {_PROTOCOL!r})", minimum=minimum)


def _bins(value: Any) -> tuple[tuple[float, float], ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"energy_bins must be a list of [low, high] pairs, got {value!r}")
    bins = []
    for item in value:
        if (not isinstance(item, list | tuple) or len(item) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in item)
                or not float(item[0]) < float(item[1])):
            raise ConfigError(f"energy_bins entries must be [low, high] with low < high, got {item!r}")
        bins.append((float(item[0]), float(item[1])))
    return tuple(bins)


@dataclass(frozen=True)
class Settings:
    """The profile settings of one cell, resolved for its system and checked."""

    variant: str
    rounds: int
    training_set: str
    n_train: int
    train_minimum: int
    train_noise: float
    n_samples: int
    ml_iterations: int
    mix_iterations: int
    mix_lambda: float
    batch_size: int
    mcmc_short_samples: int
    mcmc_long_samples: int
    mcmc_chains: int
    mcmc_burn_in: int
    mcmc_stride: int
    eps: float  #: the clustering threshold of ``cluster_norm``: setting ``eps`` (L2) or ``eps_l1``
    gtol: float
    max_steps: int
    energy_bins: tuple[tuple[float, float], ...]
    structures_per_bin: int
    model_config: Mapping[str, Any]
    minima_protocol: str = "eqbench"
    minimizer: str = "lbfgs"
    max_displacement: float = 0.3
    gd_step: float = 1e-3
    gd_max_steps: int = 100_000
    cluster_norm: str = "l2"
    cluster_rule: str = "single-linkage"
    sampling_protocol: str = "eqbench"
    long_minimise_every: int = 1

    @classmethod
    def resolve(cls, params: Mapping[str, Any], system: Any) -> Settings:
        """Read and check every setting for ``system`` (a ParticleSystem); ConfigError if invalid."""
        name = system.name

        def get(key: str) -> Any:
            return _for_system(params, key, name)

        variant = params.get("variant")
        if variant not in VARIANTS:
            raise ConfigError(f"unknown variant {variant!r} for task metastable-states; valid: {', '.join(VARIANTS)}")
        if variant != "flow":  # a reference cell's settings lack what only the flow uses
            params = {**_FLOW_ONLY, **params}
        params = {**params, **{k: v for k, v in _LATER_SETTINGS.items() if params.get(k) is None}}
        training_set = get("training_set")
        if training_set not in TRAINING_SETS:
            raise ConfigError(f"unknown training_set {training_set!r}; valid: {', '.join(TRAINING_SETS)}")
        mix_lambda = get("mix_lambda")
        if isinstance(mix_lambda, bool) or not isinstance(mix_lambda, int | float) or not 0 <= mix_lambda <= 1:
            raise ConfigError(f"mix_lambda must be a number in [0, 1], got {mix_lambda!r}")
        model_config = params.get("model_config", {})
        if not isinstance(model_config, Mapping):
            raise ConfigError(f"model_config must be a table, got {model_config!r}")
        from eqbench.minima import CLUSTER_NORMS, CLUSTER_RULES, MINIMIZERS

        minima_protocol = get("minima_protocol")
        if minima_protocol not in MINIMA_PROTOCOLS:
            raise ConfigError(f"unknown minima_protocol {minima_protocol!r}; valid: {', '.join(MINIMA_PROTOCOLS)}")

        def choice(key: str, valid: tuple[str, ...]) -> str:
            value = get(key)
            if value == _PRESET:
                return MINIMA_PROTOCOLS[minima_protocol][key]
            if value not in valid:
                raise ConfigError(f"unknown {key} {value!r}; valid: {', '.join((_PRESET, *valid))}")
            return value

        minimizer = choice("minimizer", MINIMIZERS)
        cluster_norm = choice("cluster_norm", CLUSTER_NORMS)
        cluster_rule = choice("cluster_rule", CLUSTER_RULES)
        eps_by_norm = {"l2": _positive_float(get("eps"), "eps"), "l1": _positive_float(get("eps_l1"), "eps_l1")}
        sampling_protocol = get("sampling_protocol")
        if sampling_protocol not in SAMPLING_PROTOCOLS:
            raise ConfigError(f"unknown sampling_protocol {sampling_protocol!r} (one per cell); valid: "
                              f"{', '.join(SAMPLING_PROTOCOLS)}")
        protocol = system.data_protocol
        settings = cls(
            variant=variant,
            rounds=_int(get("rounds"), "rounds", minimum=1),
            sampling_protocol=sampling_protocol,
            long_minimise_every=_int(get("long_minimise_every"), "long_minimise_every", minimum=1),
            training_set=training_set,
            n_train=_int(get("n_train"), "n_train", minimum=1),
            train_minimum=_int(get("train_minimum"), "train_minimum", minimum=0),
            train_noise=_positive_float(get("train_noise"), "train_noise"),
            n_samples=_int(get("n_samples"), "n_samples", minimum=1),
            ml_iterations=_int(get("ml_iterations"), "ml_iterations", minimum=0),
            mix_iterations=_int(get("mix_iterations"), "mix_iterations", minimum=0),
            mix_lambda=float(mix_lambda),
            batch_size=_int(get("batch_size"), "batch_size", minimum=1),
            mcmc_short_samples=_int(get("mcmc_short_samples"), "mcmc_short_samples", minimum=1),
            mcmc_long_samples=_int(get("mcmc_long_samples"), "mcmc_long_samples", minimum=1),
            mcmc_chains=_protocol_int(get("mcmc_chains"), "mcmc_chains", protocol.n_chains, 1),
            mcmc_burn_in=_protocol_int(get("mcmc_burn_in"), "mcmc_burn_in", protocol.burn_in, 0),
            mcmc_stride=_protocol_int(get("mcmc_stride"), "mcmc_stride", protocol.stride, 1),
            eps=eps_by_norm[cluster_norm],
            gtol=_positive_float(get("gtol"), "gtol"),
            max_steps=_int(get("max_steps"), "max_steps", minimum=1),
            energy_bins=_bins(get("energy_bins")),
            structures_per_bin=_int(get("structures_per_bin"), "structures_per_bin", minimum=0),
            model_config=dict(model_config),
            minima_protocol=minima_protocol,
            minimizer=minimizer,
            max_displacement=_positive_float(get("max_displacement"), "max_displacement"),
            gd_step=_positive_float(get("gd_step"), "gd_step"),
            gd_max_steps=_int(get("gd_max_steps"), "gd_max_steps", minimum=1),
            cluster_norm=cluster_norm,
            cluster_rule=cluster_rule,
        )
        if settings.training_set == "mcmc" and settings.n_train > protocol.n_train:
            raise ConfigError(f"n_train must be at most {protocol.n_train} (the {name} training pool), got {settings.n_train}")
        if settings.rounds > _MAX_ROUNDS:
            raise ConfigError(f"rounds must be at most {_MAX_ROUNDS} (each round has its own Metropolis seed), "
                              f"got {settings.rounds}")
        if settings.sampling_protocol == "eqbench" and settings.mcmc_short_samples > protocol.n_test:
            raise ConfigError(f"mcmc_short_samples must be at most {protocol.n_test} (the {name} test split) with "
                              f"sampling_protocol 'eqbench', got {settings.mcmc_short_samples}")
        if variant == "flow" and settings.ml_iterations + settings.mix_iterations < 1:
            raise ConfigError("ml_iterations + mix_iterations must be >= 1 for variant 'flow' (an untrained flow samples its prior)")
        return settings

    @property
    def trajectories(self) -> bool:
        """Whether the MCMC methods are single trajectories (``sampling_protocol = "paper"``)."""
        return self.sampling_protocol == "paper"

    @property
    def trajectory_burn_in(self) -> int:
        """Discarded Metropolis steps before a single trajectory's first sample."""
        return self.mcmc_burn_in

    @property
    def structure_bins(self) -> tuple[tuple[float, float], ...]:
        """Bins the structure plot picks minima from: the energy bins, or all energies."""
        return self.energy_bins or ((-math.inf, math.inf),)


# -- bin names --------------------------------------------------------------------------------


def _bound_label(value: float) -> str:
    text = "inf" if math.isinf(value) else f"{abs(value):g}"
    return ("m" if value < 0 else "") + text


def bin_label(low: float, high: float) -> str:
    """Metric suffix of an energy bin: ``[-80, -70)`` -> ``m80_m70``, ``(-inf, -80)`` -> ``minf_m80``."""
    return f"{_bound_label(low)}_{_bound_label(high)}"


_BOUND = r"m?(?:inf|[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)"
_BIN_RE = re.compile(rf"^(?P<base>.+?)_(?P<low>{_BOUND})_(?P<high>{_BOUND})$")


def parse_bin_label(metric: str) -> tuple[str, float, float] | None:
    """``"distinct_minima_m80_m70"`` -> ``("distinct_minima", -80.0, -70.0)``; None without a bin."""
    match = _BIN_RE.match(metric)
    if match is None:
        return None

    def bound(text: str) -> float:
        sign = -1.0 if text.startswith("m") else 1.0
        return sign * float(text.removeprefix("m"))

    return match["base"], bound(match["low"]), bound(match["high"])


# -- sampling protocols -----------------------------------------------------------------------


def _protocol_choices(params: Mapping[str, Any], system: str) -> list[Any]:
    """The ``sampling_protocol`` values of a grid point for ``system``: a plain value or list is
    the grid axis itself; a table keyed by system may give a system one value or a list of them
    (``{dw4 = "eqbench", lj13 = ["eqbench", "paper"]}``), expanded by :meth:`MetastableStates.expand_cell`."""
    value = params.get("sampling_protocol")
    if value is None:  # a grid axis the profile does not set
        value = _LATER_SETTINGS["sampling_protocol"]
    if isinstance(value, Mapping):
        value = _for_system(params, "sampling_protocol", system)
    if isinstance(value, list | tuple):
        if not value:
            raise ConfigError(f"sampling_protocol for {system} is an empty list, so no cell would run")
        return list(value)
    return [value]


def mcmc_seed(kind: str, seed: int, round_: int = 0) -> int:
    """The Metropolis seed of one run: ``base + 1_000 * seed + round`` with the bases of
    :data:`_SEED_BASES` (``eqbench-long``: 10,000, the long reference's scheme; ``paper-training``,
    ``paper-short``, ``paper-long``: 1, 2 and 3 million). Rounds below 1,000 and cell seeds below
    990 keep every seed distinct from every other and from the data splits' seeds (1-3)."""
    if not 0 <= round_ < _MAX_ROUNDS:
        raise ConfigError(f"round must lie in [0, {_MAX_ROUNDS}), got {round_}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _MAX_SEED:
        raise ConfigError(f"metastable-states seeds must be integers in [0, {_MAX_SEED}) so that its Metropolis "
                          f"seeds never coincide, got {seed!r}")
    return _SEED_BASES[kind] + 1_000 * seed + round_


def split_cost(system: Any, split: str, n: int) -> tuple[int, int]:
    """Target energy evaluations behind ``n`` rows of a stored data split (SPEC §3), as
    ``(production, burn_in)``: every row cost its chain one stride of Metropolis steps (one
    evaluation each), and the chains that made them ran the burn-in first (plus the energy of
    their starting configuration): ``min(n, chains)`` chains, since a random subset of a split
    spreads over all its chains (1,000 of the 10,000 LJ-13 rows come from nearly all 200)."""
    protocol = system.data_protocol
    return n * protocol.stride, min(n, protocol.chains(split)) * (protocol.burn_in + 1)


def _trajectory(system: Any, n: int, burn_in: int, seed: int, progress: bool, desc: str) -> Any:
    """One Metropolis trajectory (``sampling_protocol = "paper"``): ``burn_in`` discarded steps,
    then ``n`` consecutive steps, every one a sample (stride 1; a rejected move repeats the row),
    at the system's protocol step size with the CoM removed after each step. Costs ``n``
    evaluations plus ``burn_in + 1`` (the start's energy)."""
    from eqbench.data.mcmc import run_metropolis

    return run_metropolis(system, n_chains=1, samples_per_chain=n, burn_in=burn_in, stride=1,
                          step_size=system.data_protocol.step_size, seed=seed, trace_chains=1, trace_every=n,
                          progress=progress, description=desc)


# -- the task ---------------------------------------------------------------------------------


class MetastableStates(Task):
    """Distinct minima per method and energy bin; the protocol is the module docstring."""

    name = "metastable-states"
    trains = True
    summary = "distinct energy minima reached from flow samples vs the training set and short/long MCMC (§7.5, Table 1, Fig. 7)"
    systems = ("dw4", "lj13")
    grid_axes = ("variant", "sampling_protocol")
    max_seed = _MAX_SEED

    def splits_read(self) -> tuple[str, ...]:
        """Training configurations come from ``train``; the short-MCMC reference row draws its
        configurations from ``test``."""
        return ("test", "train")

    def validate(self, params: Mapping[str, Any]) -> None:
        from eqbench.components import get_system

        for system in self.systems or ():
            for choice in _protocol_choices(params, system):
                Settings.resolve({**params, "sampling_protocol": choice}, get_system(system))

    def expand_cell(self, params: Mapping[str, Any], model: str, system: str) -> list[dict[str, Any]]:
        """One cell per ``sampling_protocol`` of ``system`` (a per-system table may list several),
        each carrying its protocol as a plain value."""
        return [{**params, "sampling_protocol": choice} for choice in _protocol_choices(params, system)]

    def reference_params(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The training set and the short and long MCMC rows do not depend on the model: their
        cells keep only :data:`REFERENCE_SETTINGS` (not the model's training, sampling or
        ``model_config``, which may differ per model) and are shared by every model."""
        if params.get("variant") == "flow":
            return None
        return {key: value for key, value in params.items() if key in REFERENCE_SETTINGS}

    def cost_phases(self, params: Mapping[str, Any], system: str) -> dict[str, float]:
        """Per method: minimising the training set (per configuration), training the flow (per
        configuration-step, a λ-mix step twice), drawing flow samples, the many-chain long MCMC
        (``mcmc_wall_s``, per Metropolis step of one of its chains), single trajectories
        (``trajectory_wall_s``, per Metropolis step of the one chain: far dearer per step than a
        chain of a batch) and minimising each round's configurations (``minimize_wall_s``, per
        configuration minimised)."""
        from eqbench.components import get_system

        sys_obj = get_system(system)
        s = Settings.resolve(params, sys_obj)
        phases: dict[str, float] = {"training_set_wall_s": s.n_train}
        # Every cell makes the training set (the reference of "new minima"); the paper protocol's
        # LJ-13 training set is a trajectory.
        training_steps = s.trajectory_burn_in + s.n_train if s.trajectories and s.training_set == "mcmc" else 0
        if training_steps:
            phases["trajectory_wall_s"] = training_steps
        if s.variant == "flow":
            phases["train_wall_s"] = s.batch_size * (s.ml_iterations + 2 * s.mix_iterations)
            phases["sample_wall_s"] = s.rounds * s.n_samples
            phases["minimize_wall_s"] = s.rounds * s.n_samples
        elif s.variant == "mcmc-short":
            if s.trajectories:
                phases["trajectory_wall_s"] = training_steps + s.rounds * (s.trajectory_burn_in + s.mcmc_short_samples)
            phases["minimize_wall_s"] = s.rounds * s.mcmc_short_samples
        elif s.variant == "mcmc-long":
            if s.trajectories:
                phases["trajectory_wall_s"] = training_steps + s.rounds * (s.trajectory_burn_in + s.mcmc_long_samples)
            else:
                per_chain = math.ceil(s.mcmc_long_samples / s.mcmc_chains)
                phases["mcmc_wall_s"] = s.rounds * s.mcmc_chains * (s.mcmc_burn_in + per_chain * s.mcmc_stride)
            phases["minimize_wall_s"] = s.rounds * _n_minimised(s)
        return phases

    def run_cell(self, ctx: CellContext) -> list[Record]:
        from tqdm.auto import tqdm

        s = Settings.resolve(ctx.params, ctx.system)
        records: list[Record] = []

        def record(metric: str, value: float, unit: str = "", step: int | None = None) -> None:
            records.append(ctx.record(metric, value, unit, variant=s.variant, n_train=s.n_train, step=step))

        record("eps", s.eps, "signature distance")
        start = time.perf_counter()
        train, cost = _training_set(ctx, s, record)
        training_census = _census(ctx, s, train, "minimise training set")
        trajectory_s = sum(r.value for r in records if r.metric == "trajectory_wall_s")
        record("training_set_wall_s", time.perf_counter() - start - trajectory_s, "s")
        if s.variant == "training":
            record("energy_evaluations", cost[0], "count", 0)
            record("energy_evaluations_burn_in", cost[1], "count", 0)
        elif s.variant == "flow":
            record("energy_evaluations_training_data", cost[0], "count")
            record("energy_evaluations_training_data_burn_in", cost[1], "count")

        censuses: list[MinimaCensus] = []
        if s.variant == "training":
            censuses.append(training_census)
            _round_records(record, s, training_census, None, step=0)
        else:
            draw = _sampler(ctx, s, train, record)
            for r in tqdm(range(s.rounds), desc=f"{s.variant} rounds", disable=not show_progress(ctx.progress), leave=False):
                x = draw(r)
                start = time.perf_counter()
                census = _census(ctx, s, x, f"minimise round {r}")
                record("minimize_wall_s", time.perf_counter() - start, "s", step=r)
                censuses.append(census)
                _round_records(record, s, census, training_census, step=r)
        _structure_records(record, s, censuses, ctx.system)
        for rec in records:
            if not math.isfinite(rec.value):
                raise FloatingPointError(f"{rec.metric} is not finite ({rec.value})")
        return records

    def plot(self, table: pandas.DataFrame, out_dir: Path) -> list[Path]:
        """Per system, profile and sampling protocol (``_paper-protocol`` appended to the paper
        protocol's names): distinct minima per energy bin and method with their spread
        over rounds, the minima absent from the training set, and the counts at ε/2, ε, 2ε
        (``metastable_counts_<system>_<profile>``); the lowest distinct minima each method found
        (``metastable_structures_<system>_<profile>``, Fig. 7)."""
        written: list[Path] = []
        table = table.assign(profile=table["profile"].fillna("")) if "profile" in table else table.assign(profile="")
        # Sampling protocols are never pooled: one figure each (the paper protocol's named so).
        protocols = ([json.loads(_comparison_key(c)).get("sampling_protocol", "eqbench") for c in table["config_json"]]
                     if "config_json" in table else ["eqbench"] * len(table))
        table = table.assign(sampling_protocol=protocols)
        for (system, profile, protocol), rows in table.groupby(["system", "profile", "sampling_protocol"], sort=True):
            rows = rows.assign(method=[_method(v, m) for v, m in zip(rows["variant"], rows["model"])])
            stem = f"{system}_{profile}" if profile else str(system)
            title = str(system)
            if protocol != "eqbench":
                stem += f"_{protocol}-protocol"
                title += f", {protocol} sampling protocol"
            written += _plot_counts(rows, title, stem, out_dir)
            written += _plot_structures(rows, title, stem, out_dir)
        return written

    def report_section(self) -> TaskSection:
        """Distinct-minima counts per settings key and method beside Table 1 and §7.5; decides the
        claim that equivariant flows find all five DW-4 minima."""
        return _report_section()


# -- steps of a cell --------------------------------------------------------------------------


def _census(ctx: CellContext, s: Settings, x: torch.Tensor, desc: str) -> MinimaCensus:
    return _census_of(ctx.system, s, x, progress=show_progress(ctx.progress), desc=desc)


def _census_of(system: Any, s: Settings, x: torch.Tensor, **kwargs: Any) -> MinimaCensus:
    """:func:`eqbench.minima.census_of_minima` with the cell's minimiser and clustering."""
    from eqbench.minima import census_of_minima

    max_steps = s.max_steps if s.minimizer == "lbfgs" else s.gd_max_steps
    return census_of_minima(system, x, eps=s.eps, gtol=s.gtol, max_steps=max_steps, minimizer=s.minimizer,
                            max_displacement=s.max_displacement, gd_step=s.gd_step, norm=s.cluster_norm,
                            rule=s.cluster_rule, **kwargs)


def _n_minimised(s: Settings) -> int:
    """Configurations of a long-MCMC round that are minimised: every ``long_minimise_every``-th."""
    return math.ceil(s.mcmc_long_samples / s.long_minimise_every)


def _training_set(ctx: CellContext, s: Settings, record: RecordFn) -> tuple[torch.Tensor, tuple[int, int]]:
    """The cell's training set, float64 on the CPU (see the module docstring), and the target
    energy evaluations it cost as ``(production, burn_in)``."""
    import torch

    from eqbench.data.loading import load_data
    from eqbench.geometry import remove_com
    system = ctx.system
    if s.training_set == "mcmc":
        if s.trajectories:
            run = _trajectory(system, s.n_train, s.trajectory_burn_in, mcmc_seed("paper-training", ctx.seed),
                              show_progress(ctx.progress), f"{system.name} training trajectory")
            record("trajectory_wall_s", run.wall_s, "s")
            record("mcmc_acceptance_training", run.acceptance, "fraction")
            x = torch.from_numpy(run.samples.reshape(-1, *system.event_shape))
            return x, (s.n_train, s.trajectory_burn_in + 1)
        return load_data(system, split="train", n=s.n_train, seed=ctx.seed), split_cost(system, "train", s.n_train)
    n_search = min(_MINIMUM_SEARCH_SAMPLES, system.data_protocol.n_train)
    pool = load_data(system, split="train", n=n_search, seed=0)
    found = _census_of(system, s, pool)
    reps = found.representatives()
    if s.train_minimum >= reps.numel():
        raise ConfigError(f"train_minimum must be below {reps.numel()}: {reps.numel()} distinct {system.name} minima "
                          f"were reached from {pool.shape[0]} training samples (energies "
                          f"{', '.join(f'{e:.2f}' for e in found.distinct_energies().tolist())})")
    minimum = found.x[reps[s.train_minimum]]
    generator = torch.Generator().manual_seed(ctx.seed)
    noise = torch.randn(s.n_train, *system.event_shape, generator=generator, dtype=torch.float64)
    return remove_com(minimum + s.train_noise * noise), split_cost(system, "train", n_search)


def _sampler(ctx: CellContext, s: Settings, train: torch.Tensor, record: RecordFn) -> Callable[[int], torch.Tensor]:
    """A function ``round -> configurations`` for the cell's method, after any one-off work
    (training the flow; loading the test split)."""
    import torch

    system = ctx.system
    if s.variant == "flow":
        flow = _trained_flow(ctx, s, train, record)

        def draw_flow(r: int) -> torch.Tensor:
            start = time.perf_counter()
            generator = torch.Generator().manual_seed(1_000 * ctx.seed + r)
            x = _flow_positions(flow, s.n_samples, generator)
            record("sample_wall_s", time.perf_counter() - start, "s", step=r)
            return x

        return draw_flow
    if s.trajectories and s.variant in ("mcmc-short", "mcmc-long"):
        kind = "paper-short" if s.variant == "mcmc-short" else "paper-long"
        n = s.mcmc_short_samples if s.variant == "mcmc-short" else s.mcmc_long_samples
        keep = 1 if s.variant == "mcmc-short" else s.long_minimise_every

        def draw_trajectory(r: int) -> torch.Tensor:
            run = _trajectory(system, n, s.trajectory_burn_in, mcmc_seed(kind, ctx.seed, r),
                              show_progress(ctx.progress), f"{system.name} {s.variant} trajectory round {r}")
            record("trajectory_wall_s", run.wall_s, "s", step=r)
            record("mcmc_acceptance", run.acceptance, "fraction", step=r)
            record("energy_evaluations", n, "count", step=r)
            record("energy_evaluations_burn_in", s.trajectory_burn_in + 1, "count", step=r)
            return torch.from_numpy(run.samples.reshape(-1, *system.event_shape)[::keep])

        return draw_trajectory
    if s.variant == "mcmc-short":
        from eqbench.data.loading import load_data

        pool = load_data(system, split="test")
        n = s.mcmc_short_samples
        order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(ctx.seed))
        disjoint = s.rounds * n <= pool.shape[0]

        production, burn_in = split_cost(system, "test", n)

        def draw_short(r: int) -> torch.Tensor:
            record("energy_evaluations", production, "count", step=r)
            record("energy_evaluations_burn_in", burn_in, "count", step=r)
            if disjoint:
                return pool[order[r * n:(r + 1) * n]]
            rows = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(1_000 * ctx.seed + r))
            return pool[rows[:n]]

        return draw_short

    from eqbench.data.mcmc import run_metropolis

    def draw_long(r: int) -> torch.Tensor:
        per_chain = math.ceil(s.mcmc_long_samples / s.mcmc_chains)
        run = run_metropolis(system, n_chains=s.mcmc_chains, samples_per_chain=per_chain, burn_in=s.mcmc_burn_in,
                             stride=s.mcmc_stride, step_size=system.data_protocol.step_size,
                             seed=mcmc_seed("eqbench-long", ctx.seed, r), progress=show_progress(ctx.progress),
                             description=f"{system.name} long MCMC round {r}")
        record("mcmc_wall_s", run.wall_s, "s", step=r)
        record("mcmc_acceptance", run.acceptance, "fraction", step=r)
        record("energy_evaluations", s.mcmc_chains * per_chain * s.mcmc_stride, "count", step=r)
        record("energy_evaluations_burn_in", s.mcmc_chains * (s.mcmc_burn_in + 1), "count", step=r)
        flat = run.samples.reshape(-1, *system.event_shape)[: s.mcmc_long_samples][:: s.long_minimise_every]
        return torch.from_numpy(flat)

    return draw_long


def _trained_flow(ctx: CellContext, s: Settings, train: torch.Tensor, record: RecordFn) -> Flow:
    """Build the model and train it: ML, then the λ-mix when ``mix_iterations`` > 0 (paper C)."""
    from eqbench.components import build_model

    flow = build_model(ctx.model, ctx.system, s.model_config).to(ctx.device)
    dtype = next(flow.parameters()).dtype
    data = train.to(device=ctx.device, dtype=dtype)
    record("n_parameters", flow.n_parameters, "count")
    start = time.perf_counter()
    result, earlier, phases = None, 0.0, []  # earlier: seconds of the runs a resumed cell continued
    if s.ml_iterations:
        result = train_flow(ctx, flow, data, iterations=s.ml_iterations, batch_size=s.batch_size)
        earlier += result.earlier_wall_s
        phases.append(result)
    if s.mix_iterations:
        result = train_flow(ctx, flow, data, iterations=s.mix_iterations, batch_size=s.batch_size,
                            lambda_start=s.mix_lambda, lambda_end=s.mix_lambda, seed_offset=1)
        earlier += result.earlier_wall_s
        phases.append(result)
    record("train_wall_s", time.perf_counter() - start + earlier, "s")
    for guarded in guard_records(ctx, *phases):
        record(guarded.metric, guarded.value, guarded.unit)
    # Maximum likelihood evaluates no energy; a λ-mix step with λ > 0 evaluates the energy (and,
    # through autograd, its gradient) of kl_batch_size flow samples.
    kl_steps = result.iterations_done if s.mix_iterations and s.mix_lambda > 0 and result is not None else 0
    record("energy_evaluations", kl_steps * training_options(ctx.params)["kl_batch_size"], "count")
    record("energy_evaluations_burn_in", 0, "count")
    ctx.keep_model(flow, s.model_config)
    if result is not None and result.history:
        record("final_train_loss", result.history[-1]["loss"], "nats")
    return flow


def _flow_positions(flow: Flow, n: int, generator: torch.Generator, batch_size: int = 1000) -> torch.Tensor:
    """``n`` samples of ``flow`` (positions only, float64 on the CPU).

    Counting minima needs no density: :meth:`~eqbench.flows.base.Flow.sample_positions` (a
    continuous flow integrates its velocity alone; brute-force traces would make 10,000
    SchNet-flow samples cost minutes).
    """
    import torch

    x = sample_positions(flow, n, batch_size=batch_size, generator=generator, progress=False)
    return x.to(device="cpu", dtype=torch.float64)


def _round_records(record: RecordFn, s: Settings, census: MinimaCensus, training: MinimaCensus | None, step: int) -> None:
    """Counts of one round: per bin, at ε/2 and 2ε, new vs the training set, and the drops."""
    import torch

    from eqbench.minima import novel_minima

    record("n_samples", census.n_input, "count", step)
    record("n_nonfinite", census.n_nonfinite, "count", step)
    record("n_unconverged", census.n_unconverged, "count", step)
    record("n_saddles", census.n_saddles, "count", step)
    record("n_minima", census.n_minima, "count", step)
    variants = (("distinct_minima", census), ("distinct_minima_eps_half", census.with_eps(s.eps / 2)),
                ("distinct_minima_eps_double", census.with_eps(2 * s.eps)))
    for base, c in variants:
        record(base, c.n_distinct, "count", step)
        for (low, high), count in zip(s.energy_bins, c.counts(s.energy_bins)):
            record(f"{base}_{bin_label(low, high)}", count, "count", step)
    if training is not None:
        novel = novel_minima(census, training)
        energies = census.distinct_energies()
        record("new_minima", int(novel.sum()), "count", step)
        # Share of the kept minima (with repeats) lying in new minima: a method that puts a
        # handful of its 10,000 samples elsewhere reaches a new minimum, but rarely.
        novel_label = torch.zeros(census.n_distinct, dtype=torch.bool)
        novel_label[census.labels[census.representatives()]] = novel
        if census.n_minima:
            record("new_minima_sample_fraction", float(novel_label[census.labels].float().mean()), "fraction", step)
        for low, high in s.energy_bins:
            inside = (energies >= low) & (energies < high)
            record(f"new_minima_{bin_label(low, high)}", int((novel & inside).sum()), "count", step)
    if census.n_distinct:
        record("lowest_minimum_energy", float(census.distinct_energies()[0]), "kT", step)
    separation = census.closest_distinct_separation()
    if math.isfinite(separation):
        record("closest_distinct_separation", separation, "signature distance", step)


def _structure_records(record: RecordFn, s: Settings, censuses: Sequence[MinimaCensus], system: Any) -> None:
    """The ``structures_per_bin`` lowest distinct minima of each bin over all rounds (Fig. 7)."""
    import torch

    from eqbench.minima import MinimaCensus, distinct_minima, sorted_distance_signature

    if s.structures_per_bin == 0 or not censuses:
        return
    reps = [c.x[c.representatives()] for c in censuses]
    energies = [c.energy[c.representatives()] for c in censuses]
    x, energy = torch.cat(reps), torch.cat(energies)
    if x.shape[0] == 0:
        return
    signature = sorted_distance_signature(x)
    pooled = MinimaCensus(n_input=x.shape[0], n_nonfinite=0, n_unconverged=0, n_saddles=0, eps=s.eps, x=x,
                          energy=energy, signature=signature,
                          labels=distinct_minima(signature, s.eps, norm=s.cluster_norm, rule=s.cluster_rule),
                          norm=s.cluster_norm, rule=s.cluster_rule)
    order = pooled.representatives()
    slot = 0
    for low, high in s.structure_bins:
        inside = order[(pooled.energy[order] >= low) & (pooled.energy[order] < high)]
        for index in inside[: s.structures_per_bin].tolist():
            record("structure_energy", float(pooled.energy[index]), "kT", slot)
            for particle in range(system.n_particles):
                for axis in range(system.n_dims):
                    record(f"structure_{AXES[axis]}", float(pooled.x[index, particle, axis]), "",
                           slot * system.n_particles + particle)
            slot += 1


# -- plots (from the long table only) ---------------------------------------------------------


def _method(row_variant: str, model: str) -> str:
    """A flow's rows are shown under its model's name, a reference's under its method: the
    reference cells are shared by every model (model ``"reference"``), so each appears once."""
    return model if row_variant == "flow" else row_variant


def _method_order(methods: Sequence[str]) -> list[str]:
    refs = [m for m in VARIANTS[1:] if m in methods]
    return sorted(m for m in methods if m not in VARIANTS) + refs


def _mean_std(values: Any) -> tuple[float, float]:
    """Mean and sample std (0 for a single value) of the values over seeds and rounds."""
    if values.size == 0:
        return 0.0, 0.0
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def _count_table(rows: pandas.DataFrame, base: str, methods: list[str]) -> tuple[list[str], Any, Any]:
    """Mean and std over (seed, round) of ``base`` per energy bin (rows) and method (columns),
    with the bins' display labels; a system without bins has the single group "all minima"."""
    import numpy as np

    binned = {}
    for metric in rows["metric"].unique():
        parsed = parse_bin_label(str(metric))
        if parsed is not None and parsed[0] == base:
            binned[str(metric)] = parsed
    if binned:
        metrics = sorted(binned, key=lambda m: -binned[m][1])  # Table 1's order: highest bin first
        labels = [f"[{binned[m][1]:g}, {binned[m][2]:g})".replace("-", "−").replace("inf", "∞") for m in metrics]
    else:
        metrics, labels = [base], ["all minima"]
    mean = np.zeros((len(metrics), len(methods)))
    std = np.zeros_like(mean)
    for i, metric in enumerate(metrics):
        for j, method in enumerate(methods):
            values = rows[(rows["metric"] == metric) & (rows["method"] == method)]["value"].to_numpy(dtype=float)
            mean[i, j], std[i, j] = _mean_std(values)
    return labels, mean, std


def _bars(ax: Any, labels: list[str], methods: list[str], mean: Any, std: Any, colors: Mapping[str, str]) -> None:
    """Grouped bars: one group per label, one bar per method, error bars one std (paper C.7)."""
    import numpy as np

    width = 0.8 / max(len(methods), 1)
    centres = np.arange(len(labels))
    for j, method in enumerate(methods):
        ax.bar(centres + (j - (len(methods) - 1) / 2) * width, mean[:, j], width, yerr=std[:, j], capsize=2,
               label=method, color=colors[method])
    ax.set_xticks(centres, labels)


def _plot_counts(rows: pandas.DataFrame, system: str, stem: str, out_dir: Path) -> list[Path]:
    """Four panels: distinct minima per energy bin and method (Table 1); those absent from the
    training set; the share of each method's minima (repeats included) lying in such new
    minima; all distinct minima at ε/2, ε, 2ε (SPEC §5). Bars: mean ± std over rounds."""
    import numpy as np

    from eqbench.plots import new_figure, save_figure

    if rows[rows["metric"] == "distinct_minima"].empty:
        return []
    methods = _method_order(list(rows[rows["metric"] == "distinct_minima"]["method"].unique()))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    samplers = [m for m in methods if m != "training"]  # the training set is the reference of "new"
    fig, axes = new_figure(4, width=4.2)

    labels, mean, std = _count_table(rows, "distinct_minima", methods)
    _bars(axes[0], labels, methods, mean, std, colors)
    axes[0].set(title=f"{system}: distinct minima", xlabel="energy bin u (kT)", ylabel="count (mean ± std over rounds)")
    axes[0].legend(fontsize="small")

    labels, mean, std = _count_table(rows, "new_minima", samplers)
    _bars(axes[1], labels, samplers, mean, std, colors)
    axes[1].set(title="minima absent from the training set", xlabel="energy bin u (kT)")

    share = np.array([_mean_std(rows[(rows["metric"] == "new_minima_sample_fraction")
                                     & (rows["method"] == m)]["value"].to_numpy(float)) for m in samplers])
    _bars(axes[2], ["all minima"], samplers, share[None, :, 0], share[None, :, 1], colors)
    axes[2].set(title="share of samples in those minima", ylim=(0, 1))

    thresholds = [("distinct_minima_eps_half", "ε/2"), ("distinct_minima", "ε"), ("distinct_minima_eps_double", "2ε")]
    stats = [[_mean_std(rows[(rows["metric"] == metric) & (rows["method"] == m)]["value"].to_numpy(float))
              for m in methods] for metric, _ in thresholds]
    _bars(axes[3], [t for _, t in thresholds], methods, np.array(stats)[..., 0], np.array(stats)[..., 1], colors)
    eps = rows[rows["metric"] == "eps"]["value"]
    axes[3].set(title="all distinct minima vs threshold" + (f" (ε = {eps.iloc[0]:g})" if not eps.empty else ""))
    return save_figure(fig, out_dir, f"metastable_counts_{stem}")


def _plot_structures(rows: pandas.DataFrame, system: str, stem: str, out_dir: Path) -> list[Path]:
    """The lowest distinct minima found by each method (Fig. 7): particles projected on their two
    principal axes, lines between neighbours (pairs closer than 1.3x the shortest distance)."""
    import numpy as np

    from eqbench.plots import new_figure, save_figure

    energies = rows[rows["metric"] == "structure_energy"]
    if energies.empty:
        return []
    methods = _method_order(list(energies["method"].unique()))
    first_seed = {m: energies[energies["method"] == m]["seed"].min() for m in methods}
    n_cols = min(8, max(int(((energies["method"] == m) & (energies["seed"] == first_seed[m])).sum())
                        for m in methods))
    # new_figure lays panels out in one row; this figure is a grid (methods x slots).
    fig, _ = new_figure(1, width=1.9 * n_cols, height=2.0 * len(methods) + 0.4)
    fig.clf()
    grid = fig.subplots(len(methods), n_cols, squeeze=False)
    axes_present = [a for a in AXES if f"structure_{a}" in set(rows["metric"])]
    for i, method in enumerate(methods):
        mine = rows[(rows["method"] == method) & (rows["seed"] == first_seed[method])]
        slots = mine[mine["metric"] == "structure_energy"].sort_values("step")
        coords = {a: mine[mine["metric"] == f"structure_{a}"].sort_values("step")["value"].to_numpy(float)
                  for a in axes_present}
        n_slots = len(slots)
        for j in range(n_cols):
            ax = grid[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
            if j >= n_slots:
                ax.set_axis_off()
                continue
            slot = int(slots["step"].iloc[j])
            n_particles = len(coords[axes_present[0]]) // n_slots
            pos = np.stack([coords[a][slot * n_particles:(slot + 1) * n_particles] for a in axes_present], axis=-1)
            pos = pos - pos.mean(axis=0)
            _, _, vt = np.linalg.svd(pos, full_matrices=False)
            flat = pos @ vt[:2].T if pos.shape[1] > 2 else pos @ vt.T
            d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
            cutoff = 1.3 * d[d > 0].min() if (d > 0).any() else 0.0
            for a, b in zip(*np.nonzero(np.triu((d > 0) & (d < cutoff)))):
                ax.plot(flat[[a, b], 0], flat[[a, b], 1], color="0.6", lw=0.8, zorder=1)
            ax.scatter(flat[:, 0], flat[:, 1], s=40 if n_particles < 8 else 25, color=f"C{i % 10}", zorder=2,
                       edgecolor="k", linewidth=0.4)
            ax.set_title(f"{slots['value'].iloc[j]:.2f}", fontsize="small")
            if j == 0:
                ax.set_ylabel(method)
    fig.suptitle(f"{system}: lowest distinct minima per energy bin (u in kT)", fontsize="medium")
    return save_figure(fig, out_dir, f"metastable_structures_{stem}")


# -- report (what eqbench.report shows of this task) --------------------------------------------

#: §7.5: the equivariant flow finds all five DW-4 minima, the non-equivariant one only the one it
#: was trained on (baselines/published.csv, table §7.5).
_DW4_MINIMA = 5
_PAPER_NON_EQUIVARIANT = 1


def claim_dw4_minima(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> ClaimResult:
    """Equivariant flows trained on one DW-4 minimum find all five minima (§7.5, Fig. 7a).

    Judged for every settings key of a model with capability ``equivariant`` (method ``flow``,
    system ``dw4``): it passes when it finds 5 distinct minima in every round of every seed.
    Reproduced when every such settings key passes. The counts of models without
    ``equivariant`` (the paper: 1) are quoted beside and do not decide the verdict.
    """
    rows = ok[(ok["task"] == "metastable-states") & (ok["system"] == "dw4") & (ok["variant"] == "flow")
              & (ok["metric"] == "distinct_minima")]
    stats = seed_stats(rows, "distinct_minima")
    eq_mask = has_capability(stats, "equivariant")
    eq, neq = stats[eq_mask], stats[~eq_mask]
    if eq.empty:
        return ClaimResult(NOT_MEASURED, "needs metastable-states rows on dw4 (method 'flow') of a model with "
                                         "capability 'equivariant'.")
    parts, points, passed = [], [], True
    for _, e in eq.iterrows():
        values = rows.loc[rows["settings_key"] == e["settings_key"], "value"].astype(float)
        found = bool((values == _DW4_MINIMA).all())
        passed = passed and found
        parts.append(f"{settings_name(e)}: {describe(e, 3)} distinct minima per seed (mean over rounds), "
                     f"{len(values)} rounds in all, fewest {fmt(values.min())}: all five in every round "
                     f"{'yes' if found else 'no'}")
        points.append(point(e, short_name(e), published=float(_DW4_MINIMA)))
    if not neq.empty:
        parts.append("without 'equivariant' (not decisive; paper: 1): " + "; ".join(
            f"{settings_name(o)} {describe(o, 3)}" for _, o in neq.iterrows()))
        points += [point(o, short_name(o), published=float(_PAPER_NON_EQUIVARIANT)) for _, o in neq.iterrows()]
    return ClaimResult(REPRODUCED if passed else NOT_REPRODUCED, "; ".join(parts) + ".", tuple(points),
                       "distinct DW-4 minima")


#: Table 1's reference rows and the metastable-states method (``variant``) that reproduces each.
_TABLE1_METHODS = {"training-set": "training", "mcmc-short": "mcmc-short", "mcmc-long": "mcmc-long"}

#: The reference methods (training set, short and long MCMC) are cells of their own, shared by
#: every model (:meth:`MetastableStates.reference_params`).
_REFERENCE_CELLS = REFERENCE_MODEL


def _pair_minima(row: dict[str, Any]) -> tuple[str, str, str] | None:
    """Table 1 / §7.5 rows -> metastable-states records.

    Bins are named ``distinct_minima_-80_-70`` in published.csv and ``distinct_minima_m80_m70`` in the
    records; §7.5's ``distinct_minima_found`` is the records' ``distinct_minima``. A flow row is
    the model's ``flow`` method.
    """
    metric = row["metric"]
    if metric == "distinct_minima_found":
        metric = "distinct_minima"
    elif metric.startswith("distinct_minima_"):
        metric = "distinct_minima_" + metric.removeprefix("distinct_minima_").replace("-inf", "minf").replace("-", "m")
    else:
        return None
    if row["model"] in _TABLE1_METHODS:
        return _REFERENCE_CELLS, _TABLE1_METHODS[row["model"]], metric
    return row["model"], "flow", metric


#: How each ``sampling_protocol`` is shown in the report.
PROTOCOL_LABELS: dict[str, str] = {
    "eqbench": "eqbench: decorrelated samples of many chains",
    "paper": "paper §7.5: one consecutive trajectory per method",
}
#: Table 1's rows (published.csv model names), in the order the comparison table shows them,
#: with their labels and the energy evaluations §7.5 states for each.
_TABLE1_ROWS: tuple[tuple[str, str, str], ...] = (
    ("kernel-flow", "Table 1: EQ-FLOW", "0 own; training data 1,000"),
    ("training-set", "Table 1: TRAINING", "1,000"),
    ("mcmc-short", "Table 1: SHORT", "1,000"),
    ("mcmc-long", "Table 1: LONG", "100,000"),
)


def _comparison_key(config_text: Any) -> str:
    """What a flow cell and the reference cells it is compared with share: the reference settings
    (:data:`REFERENCE_SETTINGS`) but the method, with the defaults of settings added later. Two
    sampling protocols, or any other reference setting, never share a key."""
    import json

    try:
        params = json.loads(config_text).get("params", {}) if isinstance(config_text, str) else {}
    except ValueError:
        params = {}
    shared = {k: v for k, v in params.items() if k in REFERENCE_SETTINGS and k != "variant"}
    shared = {**shared, **{k: v for k, v in _LATER_SETTINGS.items() if shared.get(k) is None}}
    return json.dumps(shared, sort_keys=True, default=repr)


def _int_text(value: float) -> str:
    return f"{value:,.0f}" if math.isfinite(value) else "–"


def _ordering(means: Mapping[str, float]) -> str:
    """``"long > flow > short"`` by mean (``=`` for equal means)."""
    order = sorted(means, key=lambda m: -means[m])
    text = order[0]
    for prev, cur in zip(order, order[1:]):
        text += (" = " if means[prev] == means[cur] else " > ") + cur
    return text


def _table1_tables(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> list[HtmlTable]:
    """Table 1 per system, profile and comparison (the flows and the reference cells sharing
    every reference setting, :func:`_comparison_key`): each method's distinct minima per energy
    bin (mean ± std over seeds × rounds), its target energy evaluations and its sampling
    protocol; then the ordering of flow, short and long MCMC per bin, beside Table 1's rows and
    ordering (LJ-13). Protocols are never pooled: they are different comparisons."""
    import numpy as np

    rows = ok[ok["task"] == "metastable-states"] if "task" in ok.columns else ok
    if rows.empty or "config_json" not in rows.columns:
        return []
    rows = rows.assign(comparison=[_comparison_key(c) for c in rows["config_json"]],
                       method=[_method(v, m) for v, m in zip(rows["variant"], rows["model"])])
    tables = []
    for (system, profile, comparison), group in rows.groupby(["system", "profile", "comparison"], sort=True):
        counted = group[group["metric"] == "distinct_minima"]
        if counted.empty:
            continue
        methods = _method_order(list(counted["method"].unique()))
        labels, mean, std = _count_table(group, "distinct_minima", methods)
        if labels != ["all minima"]:
            all_mean, all_std = _count_table(group[~group["metric"].map(lambda m: parse_bin_label(str(m)) is not None)],
                                             "distinct_minima", methods)[1:]
            labels, mean, std = labels + ["all minima"], np.vstack([mean, all_mean]), np.vstack([std, all_std])
        settings = json.loads(comparison)
        protocol = str(settings.get("sampling_protocol", "eqbench"))
        label = PROTOCOL_LABELS.get(protocol, protocol)

        def evaluations(method: str) -> str:
            mine = group[group["method"] == method]

            def value(metric: str) -> float:
                v = mine[mine["metric"] == metric]["value"].to_numpy(float)
                return float(v.mean()) if v.size else math.nan

            own = f"{_int_text(value('energy_evaluations'))} (+{_int_text(value('energy_evaluations_burn_in'))} burn-in)"
            if method in VARIANTS:
                return own
            return (f"{own} own; training data {_int_text(value('energy_evaluations_training_data'))} "
                    f"(+{_int_text(value('energy_evaluations_training_data_burn_in'))} burn-in)")

        out = []
        for j, method in enumerate(methods):
            n = int(((counted["method"] == method)).sum())
            cells = [method, label]
            cells += [f"{mean[i, j]:.2f} ± {std[i, j]:.2f}" if n > 1 else f"{mean[i, j]:.2f}" for i in range(len(labels))]
            out.append(cells + [evaluations(method), str(n)])
        bins = len(labels) - (1 if labels[-1] == "all minima" and len(labels) > 1 else 0)
        flows = [m for m in methods if m not in VARIANTS]
        samplers = [m for m in ("mcmc-short", "mcmc-long") if m in methods]
        published = _table1_published(baselines, str(system), labels[:bins])
        for flow in flows:
            order_cells = []
            for i in range(bins):
                means = {"flow": mean[i, methods.index(flow)]}
                means.update({m.removeprefix("mcmc-"): mean[i, methods.index(m)] for m in samplers})
                text = _ordering(means)
                if published is not None and len(means) == 3:
                    text += " (as Table 1)" if text == published[1][i] else f" (Table 1: {published[1][i]})"
                order_cells.append(text)
            out.append([f"ordering, {flow}", label] + order_cells + [""] * (len(labels) - bins) + ["", ""])
        if published is not None:
            for model, name, budget in _TABLE1_ROWS:
                values = published[0].get(model)
                if values is not None:
                    out.append([name, "paper §7.5 (single trajectories)"] + values + [""] * (len(labels) - bins)
                               + [budget, "10" if model != "training-set" else "1"])
            out.append(["ordering, Table 1", "paper §7.5 (single trajectories)"] + list(published[1])
                       + [""] * (len(labels) - bins) + ["", ""])
        differing = {k: v for k, v in settings.items() if k not in ("sampling_protocol",)}
        tables.append(HtmlTable(
            caption=f"Table 1 ({system}, {profile or 'no'} profile), sampling protocol {protocol!r} ({label}): distinct "
                    "minima per energy bin (mean ± std over seeds × rounds), target energy evaluations per round "
                    "(mean; burn-in apart; a flow's own plus what its training data cost) and the ordering of "
                    f"flow, short and long MCMC per bin. Reference settings: "
                    + ", ".join(f"{k}={json.dumps(v.get(system, v) if isinstance(v, dict) else v)}"
                                for k, v in sorted(differing.items())
                                if k in ("n_train", "mcmc_short_samples", "mcmc_long_samples", "mcmc_burn_in",
                                         "long_minimise_every", "minima_protocol", "rounds")),
            header=["method", "sampling protocol"] + labels + ["energy evaluations", "values (seeds × rounds)"],
            rows=out))
    return tables


def _table1_published(baselines: pandas.DataFrame, system: str,
                      bin_labels: Sequence[str]) -> tuple[dict[str, list[str]], list[str]] | None:
    """Table 1's rows for ``system`` on the given bins: ``{model: ["38.30 ± 2.49", ...]}`` and the
    ordering of flow, short and long per bin; ``None`` without them (DW-4)."""
    if baselines is None or baselines.empty or not len(bin_labels):
        return None
    sel = baselines[(baselines["table"] == "Table 1") & (baselines["system"] == system)]
    if sel.empty:
        return None
    values: dict[str, list[str]] = {}
    means: dict[str, list[float]] = {}
    for model, _, _ in _TABLE1_ROWS:
        cells, nums = [], []
        for label in bin_labels:
            low, high = (x.strip() for x in label.strip("[)").replace("−", "-").replace("∞", "inf").split(","))
            metric = f"distinct_minima_{float(low):g}_{float(high):g}"
            hit = sel[(sel["model"] == model) & (sel["metric"] == metric)]
            if hit.empty:
                cells.append("–")
                nums.append(math.nan)
                continue
            value, error = float(hit["value"].iloc[0]), hit["error"].iloc[0]
            error_text = "" if error is None or (isinstance(error, float) and math.isnan(error)) or error == "" else \
                f" ± {float(error):.2f}"
            cells.append(f"{value:.2f}{error_text}")
            nums.append(value)
        if any(math.isfinite(v) for v in nums):
            values[model], means[model] = cells, nums
    if not {"kernel-flow", "mcmc-short", "mcmc-long"} <= set(means):
        return (values, ["–"] * len(bin_labels)) if values else None
    order = [_ordering({"flow": means["kernel-flow"][i], "short": means["mcmc-short"][i],
                        "long": means["mcmc-long"][i]}) for i in range(len(bin_labels))]
    return values, order


def _report_section() -> TaskSection:
    return TaskSection(
        task="metastable-states",
        title="Metastable states: distinct minima found",
        paper="§7.5, Table 1, Fig. 7",
        conventions="Counts of distinct minima after minimisation and sorted-distance clustering at ε: lower "
                    "bounds (§7.5), mean ± std over seeds and rounds (Table 1: over 10 rounds). LJ-13 bins "
                    "(−70, −60), (−80, −70), (−∞, −80) in the ordered-pair LJ energy (each pair counted twice) "
                    "that Table 1 uses. Two sampling protocols (setting sampling_protocol, never pooled): 'eqbench' "
                    "(decorrelated many-chain samples, which reach far more minima per sample and cost far more "
                    "energy evaluations) and 'paper' (§7.5 as written: the training set and the short and long "
                    "references are single consecutive Metropolis trajectories, 1 energy evaluation per sample). "
                    "The Table-1 tables show each protocol's counts, energy evaluations and the ordering of "
                    "flow, short and long MCMC per bin beside Table 1's. Variant = method (flow samples, training set, short and long MCMC); the "
                    "references (training set, short and long MCMC) do not depend on the model: they are "
                    "cells of model 'reference', run once per system and settings and shown once beside "
                    "every flow.",
        round_metrics=("distinct_minima", "distinct_minima_m70_m60", "distinct_minima_m80_m70",
                       "distinct_minima_minf_m80", "new_minima", "lowest_minimum_energy"),
        baseline=lambda r: r["table"] in ("Table 1", "§7.5", "SPEC §2", "Fig. 7"),
        pair=_pair_minima,
        extra_tables=_table1_tables,
        claims=(Claim("dw4-minima", "All five DW-4 minima found by the equivariant flow", "§7.5, Fig. 7a",
                      claim_dw4_minima, needs=("equivariant",)),),
        order=3,
    )


TASK = MetastableStates()
