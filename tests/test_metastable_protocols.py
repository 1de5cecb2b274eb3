"""metastable-states' two sampling protocols (issue 14): ``"eqbench"`` (decorrelated many-chain
samples) and ``"paper"`` (§7.5 as written: single consecutive Metropolis trajectories), the
target energy evaluations every method records, the Table-1 report table that keeps the
protocols apart, and the ε/2, 2ε recounts under both minima protocols.
"""

from __future__ import annotations

import math
import re
import types
from html import unescape

import pytest
import torch
from conftest import run_task_smoke

from eqbench.components import get_system
from eqbench.data.mcmc import _metropolis_step
from eqbench.errors import ConfigError
from eqbench.minima import MinimaCensus, distinct_minima
from eqbench.runner import plan_cells
from eqbench.tasks import metastable_states as ms
from eqbench.tasks.metastable_states import TASK, Settings, mcmc_seed

TASK_NAME = "metastable-states"
F64 = torch.float64
LJ_BINS = ("m70_m60", "m80_m70", "minf_m80")
#: The smoke profile scaled down so that both protocols' eight LJ-13 cells take seconds.
SMALL = {"n_train": 20, "mcmc_short_samples": 10, "mcmc_long_samples": 20, "n_samples": 10, "structures_per_bin": 1}


def _smoke_params(system: str, **overrides) -> dict:
    """The smoke flow cell's parameters of ``system`` (first planned cell) with ``overrides``."""
    cell = plan_cells(TASK_NAME, "gaussian", system, "smoke", overrides=overrides)[0]
    return dict(cell.params)


# -- planning ---------------------------------------------------------------------------------


def test_profiles_run_both_protocols_on_lj13_and_one_on_dw4() -> None:
    for profile in ("smoke", "quick", "paper", "calibrate"):
        lj = plan_cells(TASK_NAME, "kernel-flow", "lj13", profile)
        assert sorted((c.params["variant"], c.params["sampling_protocol"]) for c in lj) == sorted(
            (v, p) for v in ms.VARIANTS for p in ms.SAMPLING_PROTOCOLS), profile
        dw = plan_cells(TASK_NAME, "kernel-flow", "dw4", profile)
        assert {c.params["sampling_protocol"] for c in dw} == {"eqbench"}, profile
    only = plan_cells(TASK_NAME, "kernel-flow", "lj13", "quick", overrides={"sampling_protocol": "paper"})
    assert [c.params["sampling_protocol"] for c in only] == ["paper"] * 4
    both = plan_cells(TASK_NAME, "kernel-flow", "lj13", "quick", overrides={"sampling_protocol": ["paper", "eqbench"]})
    assert len(both) == 8
    # Protocols are reference settings: each has its own reference cells.
    ids = {p: {c.cell_id for c in lj if c.params["sampling_protocol"] == p} for p in ms.SAMPLING_PROTOCOLS}
    assert not ids["eqbench"] & ids["paper"]
    assert {"sampling_protocol", "long_minimise_every"} <= ms.REFERENCE_SETTINGS


@pytest.mark.parametrize(("override", "message"), [
    ({"sampling_protocol": "chains"}, r"unknown sampling_protocol 'chains' \(one per cell\); valid: eqbench, paper"),
    ({"sampling_protocol": {"dw4": "eqbench", "lj13": []}}, r"sampling_protocol for lj13 is an empty list"),
    ({"long_minimise_every": 0}, r"long_minimise_every must be an integer >= 1"),
    ({"rounds": 1001}, r"rounds must be at most 1000"),
])
def test_bad_protocol_settings_are_refused_at_planning(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_cells(TASK_NAME, "kernel-flow", "lj13", "smoke", overrides=override)


def test_paper_short_reference_is_not_bounded_by_the_test_split() -> None:
    """A trajectory is generated, not drawn from the stored test split."""
    lj = get_system("lj13")
    big = lj.data_protocol.n_test + 1
    params = _smoke_params("lj13", sampling_protocol="paper", mcmc_short_samples=big)
    assert Settings.resolve(params, lj).mcmc_short_samples == big
    with pytest.raises(ConfigError, match="test split"):
        Settings.resolve({**params, "sampling_protocol": "eqbench"}, lj)


def test_cost_phases_price_trajectory_steps_and_minimised_configurations() -> None:
    p = _smoke_params("lj13", sampling_protocol="paper", long_minimise_every=3)
    long = TASK.cost_phases({**p, "variant": "mcmc-long"}, "lj13")
    # smoke: n_train 100, burn-in 100, rounds 2, long 100 samples, every 3rd minimised.
    assert long == {"training_set_wall_s": 100, "trajectory_wall_s": (100 + 100) + 2 * (100 + 100),
                    "minimize_wall_s": 2 * 34}
    short = TASK.cost_phases({**p, "variant": "mcmc-short"}, "lj13")
    assert short["trajectory_wall_s"] == 200 + 2 * (100 + 50) and short["minimize_wall_s"] == 2 * 50
    eq = TASK.cost_phases({**p, "sampling_protocol": "eqbench", "variant": "mcmc-long"}, "lj13")
    assert "trajectory_wall_s" not in eq and eq["mcmc_wall_s"] == 2 * 20 * (100 + 5 * 10)
    dw4 = TASK.cost_phases({**_smoke_params("dw4", sampling_protocol="paper"), "variant": "flow"}, "dw4")
    assert "trajectory_wall_s" not in dw4  # DW-4 trains on a minimum + noise under both protocols


# -- seeds ------------------------------------------------------------------------------------


def test_metropolis_seeds_never_coincide() -> None:
    kinds = list(ms._SEED_BASES)
    seen: set[int] = set()
    count = 0
    for kind in kinds:
        for seed in range(ms._MAX_SEED):
            for r in (0, 1, ms._MAX_ROUNDS - 1):
                seen.add(mcmc_seed(kind, seed, r))
                count += 1
    assert len(seen) == count
    assert mcmc_seed("eqbench-long", 2, 3) == 10_000 + 2_000 + 3  # the long reference's scheme so far
    split_seeds = {get_system(n).data_protocol.seed(split) for n in ("dw4", "lj13")
                   for split in ("train", "val", "test")}
    assert not split_seeds & seen
    for bad in ({"seed": ms._MAX_SEED}, {"seed": -1}, {"round_": ms._MAX_ROUNDS}):
        with pytest.raises(ConfigError):
            mcmc_seed("paper-long", **{"seed": 0, **bad})


# -- the paper protocol's trajectories ---------------------------------------------------------


class _CountingEnergy:
    """Counts the configurations whose energy a system evaluates."""

    def __init__(self, monkeypatch, system) -> None:
        self.n = 0
        original = type(system).energy

        def energy(obj, x):
            self.n += x.reshape(-1, *system.event_shape).shape[0]
            return original(obj, x)

        monkeypatch.setattr(type(system), "energy", energy)


def test_paper_training_set_is_consecutive_steps_of_one_chain(monkeypatch) -> None:
    """The training set is n_train consecutive states of one Metropolis chain after the burn-in:
    replaying the chain step by step from its seed, every row is the state after one more
    proposal (equal to the row before when rejected, one move away when accepted); it costs
    exactly burn-in + 1 + n_train energy evaluations, which the cell records."""
    lj = get_system("lj13")
    s = Settings.resolve({**_smoke_params("lj13", sampling_protocol="paper", n_train=60, mcmc_burn_in=25),
                          "variant": "training"}, lj)
    records: list[tuple] = []
    ctx = types.SimpleNamespace(system=lj, seed=3, progress=False)
    counter = _CountingEnergy(monkeypatch, lj)
    x, cost = ms._training_set(ctx, s, lambda *a, **k: records.append((a, k)))
    assert counter.n == 25 + 1 + 60 == sum(cost)
    assert cost == (60, 26)
    assert x.shape == (60, 13, 3) and x.dtype == F64

    generator = torch.Generator().manual_seed(mcmc_seed("paper-training", 3))
    state = lj.initial_configurations(1, generator)
    u = lj.energy(state)
    for _ in range(25):
        state, u, _ = _metropolis_step(lj, state, u, lj.data_protocol.step_size, generator)
    moved = 0
    for row in x:
        before = state.clone()
        state, u, accept = _metropolis_step(lj, state, u, lj.data_protocol.step_size, generator)
        torch.testing.assert_close(row, state[0], rtol=0, atol=0)
        if bool(accept):
            moved += 1
            assert float((state - before).abs().max()) < 8 * lj.data_protocol.step_size
        else:
            assert torch.equal(state, before)
    assert 0 < moved < 60  # LJ-13 at step 0.025 accepts about a third
    # Consecutive rows of the training set: equal or one accepted move apart.
    diffs = (x[1:] - x[:-1]).abs().amax(dim=(1, 2))
    assert int((diffs == 0).sum()) + int((diffs > 0).sum()) == 59 and float(diffs.max()) < 0.2
    assert float(torch.linalg.norm(x.mean(dim=1), dim=-1).max()) < 1e-12  # CoM removed
    # Another cell seed, another chain; the eqbench protocol reads the stored split.
    other, _ = ms._training_set(types.SimpleNamespace(system=lj, seed=4, progress=False), s, lambda *a, **k: None)
    assert not torch.equal(other, x)


@pytest.mark.parametrize(("protocol", "variant", "production", "burn_in", "rows"), [
    # Hand-computed: smoke LJ-13 settings with short 10, long 20 samples, burn-in 30; the eqbench
    # long reference runs 20 chains at stride 10 (one sample per chain); stored LJ-13 splits:
    # 200 chains, burn-in 65,000, stride 4,000.
    ("paper", "mcmc-short", 10, 31, 10),
    ("paper", "mcmc-long", 20, 31, 7),  # every 3rd of 20 consecutive samples is minimised
    ("eqbench", "mcmc-short", 10 * 4000, 10 * 65_001, 10),
    ("eqbench", "mcmc-long", 20 * 1 * 10, 20 * 31, 7),
])
def test_each_round_records_its_energy_evaluations(monkeypatch, protocol, variant, production, burn_in, rows) -> None:
    """A round of a short or long reference records exactly the evaluations its samples cost
    (paper trajectories: counted on the energy function itself) and the burn-in apart."""
    lj = get_system("lj13")
    s = Settings.resolve({**_smoke_params("lj13", sampling_protocol=protocol, mcmc_short_samples=10,
                                          mcmc_long_samples=20, mcmc_burn_in=30, long_minimise_every=3),
                          "variant": variant}, lj)
    got: dict[str, list[float]] = {}
    ctx = types.SimpleNamespace(system=lj, seed=0, progress=False)
    draw = ms._sampler(ctx, s, None, lambda metric, value, unit="", step=None: got.setdefault(metric, []).append(value))
    counter = _CountingEnergy(monkeypatch, lj)
    x = draw(1)
    assert x.shape == (rows, 13, 3)
    assert got["energy_evaluations"] == [production] and got["energy_evaluations_burn_in"] == [burn_in]
    if protocol == "paper":
        assert counter.n == production + burn_in
        trajectory = ms._trajectory(lj, 20 if variant == "mcmc-long" else 10, 30,
                                    mcmc_seed("paper-long" if variant == "mcmc-long" else "paper-short", 0, 1),
                                    False, "")
        torch.testing.assert_close(x, torch.from_numpy(trajectory.samples[::3 if variant == "mcmc-long" else 1, 0]))


def test_training_set_costs_under_both_protocols() -> None:
    """eqbench: n rows of the stored training split; DW-4's minimum: the 1,000 split rows searched."""
    lj, dw = get_system("lj13"), get_system("dw4")
    assert ms.split_cost(lj, "train", 1000) == (4_000_000, 200 * 65_001)
    assert ms.split_cost(lj, "test", 50) == (200_000, 50 * 65_001)
    assert ms.split_cost(dw, "train", 1000) == (1000 * dw.data_protocol.stride,
                                                dw.data_protocol.n_chains * (dw.data_protocol.burn_in + 1))


# -- records of a smoke run under both protocols -------------------------------------------------


@pytest.fixture(scope="module")
def lj13_both(tmp_path_factory):
    """The LJ-13 smoke profile of the closed-form Gaussian (no training iterations), both
    protocols, scaled down to a few seconds (n_train 20, short 10, long 20, 10 flow samples)."""
    directory = tmp_path_factory.mktemp("meta_protocols")
    results, table = run_task_smoke(TASK_NAME, "gaussian", "lj13", directory, overrides=SMALL,
                                    expect_metrics=("energy_evaluations", "energy_evaluations_burn_in",
                                                    "energy_evaluations_training_data", "trajectory_wall_s"))
    return results, directory


def _by(results, protocol: str, variant: str, metric: str) -> list[float]:
    return [r.value for c in results if c.config["params"]["sampling_protocol"] == protocol
            for r in c.records if r.variant == variant and r.metric == metric]


@pytest.mark.slow
def test_energy_evaluations_are_recorded_exactly(lj13_both) -> None:
    """Hand-computed from the smoke profile with :data:`SMALL` (LJ-13: n_train 20, burn-in 100,
    short 10, long 20, 2 rounds; eqbench long: 20 chains, stride 10, so one sample per chain;
    stored LJ-13 splits: 200 chains, burn-in 65,000, stride 4,000)."""
    results, _ = lj13_both
    expected = {  # (protocol, variant): (production, burn-in) per round (training: once)
        ("paper", "training"): ([20.0], [101.0]),
        ("paper", "mcmc-short"): ([10.0] * 2, [101.0] * 2),
        ("paper", "mcmc-long"): ([20.0] * 2, [101.0] * 2),
        ("eqbench", "training"): ([20 * 4000.0], [20 * 65_001.0]),
        ("eqbench", "mcmc-short"): ([10 * 4000.0] * 2, [10 * 65_001.0] * 2),
        ("eqbench", "mcmc-long"): ([20 * 1 * 10.0] * 2, [20 * 101.0] * 2),
        ("paper", "flow"): ([0.0], [0.0]),  # the Gaussian is fitted in closed form
        ("eqbench", "flow"): ([0.0], [0.0]),
    }
    for (protocol, variant), (production, burn_in) in expected.items():
        assert _by(results, protocol, variant, "energy_evaluations") == production, (protocol, variant)
        assert _by(results, protocol, variant, "energy_evaluations_burn_in") == burn_in, (protocol, variant)
    for protocol in ms.SAMPLING_PROTOCOLS:  # the flow's data cost what the training method cost
        assert _by(results, protocol, "flow", "energy_evaluations_training_data") == _by(
            results, protocol, "training", "energy_evaluations")
        assert _by(results, protocol, "flow", "energy_evaluations_training_data_burn_in") == _by(
            results, protocol, "training", "energy_evaluations_burn_in")
    assert not _by(results, "eqbench", "mcmc-long", "mcmc_energy_evaluations")  # unified
    # Each paper round minimises its whole trajectory (long_minimise_every = 1).
    assert _by(results, "paper", "mcmc-long", "n_samples") == [20.0, 20.0]
    assert len(_by(results, "paper", "mcmc-long", "trajectory_wall_s")) == 3  # training + 2 rounds


@pytest.mark.slow
def test_report_shows_each_protocol_in_its_own_table1_table(lj13_both) -> None:
    from eqbench import report

    _, directory = lj13_both
    figures = sorted(p.name for p in directory.rglob("metastable_counts_*.png"))
    assert figures == ["metastable_counts_lj13_smoke.png", "metastable_counts_lj13_smoke_paper-protocol.png"]
    html = unescape(report.render_report(directory))
    meta = html.split('id="task-metastable-states"')[1].split("</section>")[0]
    captions = re.findall(r"<caption>(Table 1 \(lj13, smoke profile\), sampling protocol '(\w+)'.*?)</caption>", meta,
                          re.S)
    assert sorted(p for _, p in captions) == ["eqbench", "paper"]
    for protocol in ("eqbench", "paper"):
        body = meta.split(f"sampling protocol '{protocol}'")[1].split("</table>")[0]
        rows = [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]
        by = {r[0]: r for r in rows if r}
        assert {"gaussian", "training", "mcmc-short", "mcmc-long", "ordering, gaussian", "Table 1: SHORT",
                "ordering, Table 1"} <= set(by)
        label = ms.PROTOCOL_LABELS[protocol]
        assert all(by[m][1] == label for m in ("gaussian", "training", "mcmc-short", "mcmc-long"))
        # values: 2 rounds x 1 seed per sampler, never the 4 of two pooled protocols.
        assert by["mcmc-short"][-1] == "2" and by["training"][-1] == "1"
        budget = {"paper": ("10 (+101 burn-in)", "20 (+101 burn-in) own"),
                  "eqbench": ("40,000 (+650,010 burn-in)", "80,000 (+1,300,020 burn-in)")}[protocol]
        assert by["mcmc-short"][-2] == budget[0]
        assert "training data " + budget[1].removesuffix(" own") in by["gaussian"][-2]
        assert by["ordering, Table 1"][2:5] == ["long > flow > short", "long > flow > short", "flow = long > short"]
        assert by["Table 1: LONG"][-2] == "100,000"


def test_comparison_key_keeps_protocols_and_settings_apart() -> None:
    import json

    lj = plan_cells(TASK_NAME, "kernel-flow", "lj13", "smoke")
    keys = {}
    for c in lj:
        key = ms._comparison_key(json.dumps({"params": c.params}))
        keys.setdefault(key, set()).add(c.params["variant"])
    assert len(keys) == 2 and all(v == set(ms.VARIANTS) for v in keys.values())


# -- recounts under both minima protocols --------------------------------------------------------


@pytest.mark.parametrize(("minima_protocol", "norm", "rule", "counts"), [
    # Hand-counted on the signatures below with eps = 1: (eps/2, eps, 2 eps) of the bin [-70, -60).
    ("eqbench", "l2", "single-linkage", (3, 1, 1)),
    ("paper-code", "l1", "first-representative", (3, 3, 2)),
])
def test_per_bin_recounts_at_half_and_double_eps_under_both_minima_protocols(minima_protocol, norm, rule,
                                                                             counts) -> None:
    """The task's round records recount every bin at eps/2 and 2 eps with the cell's own norm and
    rule (paper-code: L1 and first representative, at eps_l1)."""
    lj = get_system("lj13")
    s = Settings.resolve({**_smoke_params("lj13", minima_protocol=minima_protocol, eps=1.0, eps_l1=1.0),
                          "variant": "mcmc-short"}, lj)
    assert (s.cluster_norm, s.cluster_rule, s.eps) == (norm, rule, 1.0)
    signature = torch.tensor([[0.0, 0.0], [0.6, 0.6], [1.2, 1.2], [10.0, 10.0]], dtype=F64)
    energy = torch.tensor([-65.0, -64.0, -63.0, -75.0], dtype=F64)
    census = MinimaCensus(n_input=4, n_nonfinite=0, n_unconverged=0, n_saddles=0, eps=s.eps,
                          x=torch.zeros(4, 13, 3, dtype=F64), energy=energy, signature=signature,
                          labels=distinct_minima(signature, s.eps, norm=s.cluster_norm, rule=s.cluster_rule),
                          norm=s.cluster_norm, rule=s.cluster_rule)
    got: dict[str, float] = {}
    ms._round_records(lambda metric, value, unit="", step=None: got.__setitem__(metric, value), s, census, None, 0)
    names = ("distinct_minima_eps_half", "distinct_minima", "distinct_minima_eps_double")
    assert tuple(got[f"{n}_m70_m60"] for n in names) == counts
    assert tuple(got[f"{n}_m80_m70"] for n in names) == (1, 1, 1)
    assert tuple(got[f"{n}_minf_m80"] for n in names) == (0, 0, 0)
    assert tuple(got[n] for n in names) == tuple(c + 1 for c in counts)
    assert math.isfinite(got["closest_distinct_separation"])


def test_seeds_outside_the_metropolis_seed_range_are_refused_at_planning():
    """Metropolis seeds are base + 1,000 seed + round: seed 990 and above would collide, so the
    plan refuses them before any work (the run-time check stays as a second line)."""
    from eqbench.planning import plan_cells

    assert plan_cells("metastable-states", "kernel-flow", "dw4", "smoke", seed=989)
    with pytest.raises(ConfigError, match=r"task metastable-states takes seeds in \[0, 990\)"):
        plan_cells("metastable-states", "kernel-flow", "dw4", "smoke", seed=990)
