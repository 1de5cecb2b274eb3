"""Known-answer tests of eqbench.free_energy: log Z on U by AIS, the DW-2 quadrature, H(p) and KL.

Tolerance of every AIS check: ``|estimate - exact| < max(3 standard errors, 0.01)`` and
``< 0.05`` nats absolute. A factor 2 in the base normaliser on U (½ k log 2π, k = (N-1) D) or in
the energy shifts log Z by ~3 nats or more for these systems; a sign error in the AIS increments
by more; a wrong Jacobian between U and the relative coordinate by ½ D log 2 ≥ 0.69.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from eqbench.components import get_system
from eqbench.flows.prior import CoMFreeNormal
from eqbench.free_energy import (
    AISSettings,
    ais_log_z,
    base_log_z,
    entropy,
    kl_from_nll,
    pair_log_z_quadrature,
    reverse_ais_log_z,
)
from eqbench.geometry import remove_com
from eqbench.systems.harmonic import Harmonic


@dataclasses.dataclass(frozen=True)
class ScaledTrap:
    """``κ u_harmonic(x) = κ |x|²/2`` on U: ``log Z = ½ k log(2π/κ)``."""

    kappa: float
    n_particles: int = 4
    n_dims: int = 3

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return self.kappa * get_system("harmonic").energy(x)

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        return self.kappa * get_system("harmonic").gradient(x)

    def exact_log_z(self) -> float:
        k = (self.n_particles - 1) * self.n_dims
        return 0.5 * k * math.log(2.0 * math.pi / self.kappa)


def assert_close(result, exact: float) -> None:
    error = abs(result.log_z - exact)
    assert error < max(3.0 * result.log_z_stderr, 0.01), (result.log_z, result.log_z_stderr, exact)
    assert error < 0.05, (result.log_z, exact)


FAST = AISSettings(n_chains=2000, n_temperatures=200, n_pilot_chains=32, seed=3)


def test_base_normaliser_is_the_nll_constant_on_u():
    """σ = 1 gives SPEC §1's Gaussian constant (5.514 DW-4, 33.082 LJ-13), i.e. the prior's."""
    assert base_log_z(4, 2) == pytest.approx(5.514, abs=1e-3)
    assert base_log_z(13, 3) == pytest.approx(33.082, abs=1e-3)
    assert base_log_z(13, 3) == get_system("lj13").prior_log_normaliser()
    assert base_log_z(4, 3, 2.0) == pytest.approx(4.5 * math.log(2 * math.pi * 4.0))


def test_harmonic_from_the_prior_is_exact():
    """Target = base: every increment vanishes, log Z is the closed form to rounding."""
    trap = get_system("harmonic")
    result = ais_log_z(trap, dataclasses.replace(FAST, n_temperatures=10))
    assert result.log_z == pytest.approx(0.5 * trap.n_dof * math.log(2 * math.pi), abs=1e-10)
    assert result.ess_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("kappa, scale", [(1.0, 1.6), (4.0, 1.0), (0.25, 1.0)])
def test_harmonic_trap_known_answer(kappa, scale):
    """Narrower (κ = 4), wider (κ = 1/4) targets than the base, and a base wider than the target."""
    trap = ScaledTrap(kappa)
    result = ais_log_z(trap, dataclasses.replace(FAST, base_scale=scale))
    assert_close(result, trap.exact_log_z())
    assert 0.35 < min(result.acceptance) and max(result.acceptance) < 0.8  # the pilot hit its target


def test_reverse_ais_from_exact_samples():
    """Reverse AIS from exact samples estimates the same log Z (the upper side of the sandwich)."""
    trap = ScaledTrap(4.0)
    settings = dataclasses.replace(FAST, base_scale=1.0)
    forward = ais_log_z(trap, settings)
    generator = torch.Generator().manual_seed(11)
    exact = remove_com(torch.randn(1000, 4, 3, generator=generator, dtype=torch.float64)) / 2.0  # σ² = 1/κ
    reverse = reverse_ais_log_z(trap, exact, forward.step_sizes, settings)
    assert reverse.direction == "reverse"
    assert_close(reverse, trap.exact_log_z())


@pytest.mark.parametrize("n_dims", [2, 3])
def test_pair_quadrature_jacobian_on_the_gaussian(n_dims):
    """Z_U = 2^(-D/2) S_(D-1) ∫ r^(D-1) e^(-u) dr: equals (2π)^(D/2) for u = |x|²/2 = r²/4."""
    pair = Harmonic(name="pair", n_particles=2, n_dims=n_dims)
    assert pair_log_z_quadrature(pair) == pytest.approx(0.5 * n_dims * math.log(2 * math.pi), abs=1e-9)


def test_dw2_ais_matches_radial_quadrature():
    """DW-2 from the production base (σ = 2.35): AIS against the 1-D quadrature (7.2604)."""
    dw2 = get_system("dw2")
    exact = pair_log_z_quadrature(dw2)
    assert exact == pytest.approx(7.2604, abs=1e-3)
    result = ais_log_z(dw2, AISSettings(n_chains=2000, n_temperatures=200, base_scale=2.35,
                                        n_pilot_chains=64, seed=1))
    assert_close(result, exact)


# Resampling below ESS 0.95 forces it often on these easy targets (0.5 would rarely trigger).
SMC = dataclasses.replace(FAST, resample_ess=0.95, n_groups=20)


@pytest.mark.parametrize("kappa, scale", [(4.0, 1.0), (0.25, 1.0)])
def test_smc_harmonic_trap_known_answer(kappa, scale):
    """Sequential Monte Carlo (resampled populations) on the traps: the same known answers.

    The resampling must happen for the check to mean anything; forgetting to bank a population's
    mean weight at a resampling shifts the estimate by that mean (nats here) and fails.
    """
    trap = ScaledTrap(kappa)
    result = ais_log_z(trap, dataclasses.replace(SMC, base_scale=scale))
    assert result.resamplings >= 20
    assert len(result.log_weights) == 20  # one estimate per population
    assert_close(result, trap.exact_log_z())
    assert result.summary()["estimator"].startswith("sequential Monte Carlo, 20 independent populations of 100")


def test_smc_reverse_and_dw2():
    """Reverse SMC from exact samples (upper side) on a trap, and forward SMC on DW-2 against quadrature."""
    trap = ScaledTrap(4.0)
    forward = ais_log_z(trap, SMC)
    generator = torch.Generator().manual_seed(11)
    exact = remove_com(torch.randn(1000, 4, 3, generator=generator, dtype=torch.float64)) / 2.0
    reverse = reverse_ais_log_z(trap, exact, forward.step_sizes, SMC)
    assert reverse.resamplings > 0
    assert_close(reverse, trap.exact_log_z())
    dw2 = get_system("dw2")
    result = ais_log_z(dw2, AISSettings(n_chains=2000, n_temperatures=200, base_scale=2.35, n_pilot_chains=64,
                                        seed=1, resample_ess=0.95, n_groups=20))
    assert result.resamplings > 0
    assert_close(result, pair_log_z_quadrature(dw2))


def test_entropy_and_kl_vanish_for_the_target_itself():
    """q = p (the prior is the harmonic target): NLL − H ≈ 0; a q wider by 1.2 gives the analytic KL."""
    trap = get_system("harmonic")
    k = trap.n_dof
    log_z = ais_log_z(trap, dataclasses.replace(FAST, base_scale=1.5))
    generator = torch.Generator().manual_seed(7)
    x = CoMFreeNormal(4, 3).sample(20_000, generator=generator, dtype=torch.float64)
    u = trap.energy(x)
    h = entropy(trap, log_z.log_z, float(u.mean()), log_z_stderr=log_z.log_z_stderr,
                mean_energy_stderr=float(u.std() / math.sqrt(len(u))))
    assert h.entropy == pytest.approx(0.5 * k * (1 + math.log(2 * math.pi)), abs=0.1)
    nll = -CoMFreeNormal(4, 3).log_prob(x)
    same = kl_from_nll(float(nll.mean()), float(nll.std() / math.sqrt(len(nll))), h)
    assert abs(same.kl) < 3 * same.stderr and same.stderr < 0.05
    s = 1.2  # q = N(0, s² I) on U: KL(p‖q) = k/2 (1/s² - 1 + 2 log s)
    nll_wide = x.pow(2).sum(dim=(-2, -1)) / (2 * s * s) + 0.5 * k * math.log(2 * math.pi * s * s)
    wide = kl_from_nll(float(nll_wide.mean()), float(nll_wide.std() / math.sqrt(len(x))), h)
    analytic = 0.5 * k * (1 / s**2 - 1 + 2 * math.log(s))
    assert abs(wide.kl - analytic) < 3 * wide.stderr
    assert wide.kl > 3 * wide.stderr  # and it is told apart from zero


def test_settings_are_checked():
    with pytest.raises(ValueError, match="n_chains"):
        AISSettings(n_chains=1)
    with pytest.raises(ValueError, match="base_scale"):
        AISSettings(base_scale=0.0)
    with pytest.raises(ValueError, match="step sizes"):
        ais_log_z(get_system("harmonic"), FAST, steps=[0.1])
    with pytest.raises(ValueError, match="go together"):
        AISSettings(resample_ess=0.5)
    with pytest.raises(ValueError, match="divides n_chains"):
        AISSettings(n_chains=100, resample_ess=0.5, n_groups=7)
    with pytest.raises(ValueError, match="resample_ess"):
        AISSettings(n_chains=100, resample_ess=1.5, n_groups=10)


def test_smc_fields_stay_out_of_a_plain_estimate_key():
    """Plain AIS settings hash as before the SMC fields existed, so cached log Z records stay valid."""
    assert "resample_ess" not in AISSettings().key_fields()
    assert AISSettings(n_chains=100, resample_ess=0.5, n_groups=10).key_fields()["n_groups"] == 10


# ------------------------------------------------------------------------ cache and command line
@pytest.fixture
def harmonic_cache(tmp_path, monkeypatch):
    """A fresh EQBENCH_CACHE holding only the harmonic test data (copied from the real cache)."""
    import shutil

    from eqbench.data import store

    trap = get_system("harmonic")
    sources = store.dataset_paths(trap, "test")
    store.ensure_dataset(trap, "test")
    monkeypatch.setenv("EQBENCH_CACHE", str(tmp_path))
    for source, target in zip(sources, store.dataset_paths(trap, "test")):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    return trap


def test_log_z_is_cached_beside_the_data_and_reused(harmonic_cache, monkeypatch):
    from eqbench.data import log_z, store
    from eqbench.errors import DataError

    trap = harmonic_cache
    settings = AISSettings(n_chains=100, n_temperatures=5)
    with pytest.raises(DataError, match="not cached"):
        log_z.load_log_z(trap, settings, compute="never")
    record = log_z.load_log_z(trap, settings)
    path = log_z.log_z_path(trap, settings)
    assert path.parent == store.data_dir() and path.is_file() and record["path"] == str(path)
    assert record["log_z"] == pytest.approx(4.5 * math.log(2 * math.pi), abs=1e-10)
    assert record["entropy"] == pytest.approx(record["mean_energy"] + record["log_z"])
    assert abs(record["mean_energy"] - 4.5) < 3 * record["mean_energy_stderr"]
    assert {"acceptance", "step_sizes", "ess_fraction", "wall_s", "seed"} <= set(record["forward"])
    assert record["reverse"]["log_z"] == pytest.approx(record["log_z"], abs=1e-10)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached log Z")

    monkeypatch.setattr(log_z, "compute_log_z", fail)
    assert log_z.load_log_z(trap, settings, compute="never")["log_z"] == record["log_z"]
    path.write_text('{"system": "harmonic"}')  # broken: recomputed (here: the stub fails loudly)
    with pytest.raises(AssertionError, match="recomputed"), pytest.warns(UserWarning, match="recomputing"):
        log_z.load_log_z(trap, settings)


def test_cli_log_z(harmonic_cache, capsys):
    from eqbench.cli import main

    assert main(["log-z", "harmonic"]) == 0
    out = capsys.readouterr().out
    assert "log Z (forward AIS)      8.2704" in out and "H(p) = <u> + log Z" in out
    assert main(["log-z", "harmonic", "--cached-only", "--json"]) == 0
    assert '"log_z": 8.2704' in capsys.readouterr().out
    assert main(["log-z", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown system 'nope'" in err[0] and "dw2, dw4, harmonic, lj13" in err[0]
    assert main(["log-z", "dw4", "--cached-only"]) == 2  # nothing computed in a fresh cache


def test_cli_log_z_names_smc(harmonic_cache, capsys, monkeypatch):
    """A system whose production setting resamples prints SMC, populations and resamplings."""
    from eqbench.cli import main
    from eqbench.data import log_z

    smc = AISSettings(n_chains=200, n_temperatures=50, base_scale=1.5, n_pilot_chains=32, resample_ess=0.95, n_groups=10)
    monkeypatch.setitem(log_z.PRODUCTION_SETTINGS, "harmonic", smc)
    assert main(["log-z", "harmonic"]) == 0
    out = capsys.readouterr().out
    assert "log Z (forward SMC)" in out and "log Z (reverse SMC)" in out
    assert "of 10 populations' estimates" in out and "resampled below ESS 0.95 in 10 populations" in out
    record = log_z.load_log_z(get_system("harmonic"), compute="never")
    assert record["forward"]["resamplings"] > 0 and len(record["forward"]["population_log_z"]) == 10
    assert abs(record["log_z"] - 4.5 * math.log(2 * math.pi)) < 0.1
    # The units built on it (kl_test, reverse_kl) name the estimator: SMC here, AIS for a plain record.
    assert log_z.log_z_method(record) == "forward SMC (AIS with resampling)"
    plain = log_z.load_log_z(get_system("harmonic"), AISSettings(n_chains=100, n_temperatures=5))
    assert log_z.log_z_method(plain) == "forward AIS"


def test_every_registered_system_has_a_production_log_z_setting():
    """A system's log Z (and with it every KL of its NLLs) comes from a setting measured for it,
    never from the generic defaults (σ = 1 fits neither LJ-13's 0.71 nor lj13-single's 0.91)."""
    import eqbench.components  # noqa: F401  (registers the built-in systems)
    from eqbench.data import log_z
    from eqbench.registry import SYSTEMS

    builtin = {name for name in SYSTEMS.names() if SYSTEMS.entry(name).origin == "eqbench"}
    assert builtin and builtin <= set(log_z.PRODUCTION_SETTINGS), builtin - set(log_z.PRODUCTION_SETTINGS)
