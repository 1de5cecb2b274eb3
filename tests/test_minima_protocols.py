"""The two minimisers and the two clusterings of the metastable-states task (paper §7.5), and the
``minima_protocol`` preset that selects eqbench's combination or that of the authors' code
(en_flows ``deprecated/eqnode/minima.py``: gradient descent, L1 norm, first representative).

Clustering counts are hand-computed on vectors placed on a line or a diagonal:
points 0, 0.8, 1.6, 2.4 at ε = 1 form one chain (single linkage: 1 cluster) but two
representatives (0 takes 0.8; 1.6 is 1.6 from 0, a new one; 2.4 is 0.8 from 1.6);
(0, 0) and (0.6, 0.6) lie 0.8485 apart in L2 and 1.2 in L1.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_task_smoke

from eqbench.api import get_system
from eqbench.errors import ConfigError
from eqbench.minima import (
    MinimaCensus,
    census_of_minima,
    distinct_minima,
    gradient_descent,
    minimize,
    minimize_with,
    novel_minima,
    sorted_distance_signature,
)
from eqbench.runner import plan_cells
from eqbench.tasks.metastable_states import REFERENCE_SETTINGS, Settings

F64 = torch.float64
TASK_NAME = "metastable-states"
#: The five DW-4 minima (SPEC §2, README "Systems").
DW4_MINIMA = (-25.7922, -25.3124, -24.3524, -23.4654, -21.0665)
LINE = torch.tensor([[0.0], [0.8], [1.6], [2.4]], dtype=F64)


def _labels(vectors: list[list[float]] | torch.Tensor, eps: float, norm: str, rule: str, **kw) -> list[int]:
    return distinct_minima(torch.as_tensor(vectors, dtype=F64), eps, norm=norm, rule=rule, **kw).tolist()


# -- minimisers -------------------------------------------------------------------------------


def test_gradient_descent_reaches_the_lbfgs_minimum_near_each_dw4_minimum() -> None:
    """From configurations close to DW-4 minima (L-BFGS minima of random starts, displaced by
    0.05), small-step gradient descent and L-BFGS end at the same minimum: one of the five
    known energies, the same sorted distances."""
    dw4 = get_system("dw4")
    starts = dw4.initial_configurations(40, torch.Generator().manual_seed(0)).to(F64)
    relaxed = minimize(dw4, starts, gtol=1e-9)
    assert bool(relaxed.converged.all())
    found = {min(range(5), key=lambda k: abs(float(e) - DW4_MINIMA[k])) for e in relaxed.energy}
    assert len(found) >= 3, found  # the starts cover several of the five minima
    near = relaxed.x + 0.05 * torch.randn(relaxed.x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    gd = gradient_descent(dw4, near, step=1e-2, gtol=1e-7, max_steps=50_000)
    lb = minimize_with(dw4, near, minimizer="lbfgs", gtol=1e-7)
    assert bool(gd.converged.all()) and bool(lb.converged.all())
    assert bool((gd.steps > lb.steps).all())  # fixed small steps need many more
    torch.testing.assert_close(gd.energy, lb.energy, rtol=0, atol=1e-9)
    torch.testing.assert_close(gd.energy, relaxed.energy, rtol=0, atol=1e-9)
    torch.testing.assert_close(sorted_distance_signature(gd.x), sorted_distance_signature(lb.x), rtol=0, atol=1e-6)
    for e in gd.energy.tolist():
        assert min(abs(e - m) for m in DW4_MINIMA) < 1e-3, e


def test_gradient_descent_counts_unconverged_rows_and_caps_huge_steps() -> None:
    """Too few steps leave rows unconverged (returned, flagged); an overlapping LJ-13 start
    (gradient ~1e12) moves no particle further than the cap in one step."""
    lj = get_system("lj13")
    starts = lj.initial_configurations(3, torch.Generator().manual_seed(2)).to(F64)
    starts[0, 1] = starts[0, 0] + 0.05  # near-overlap
    res = gradient_descent(lj, starts, step=1e-3, gtol=1e-6, max_steps=1, max_displacement=0.01)
    assert res.x.shape == starts.shape and res.n_unconverged == 3
    from eqbench.geometry import remove_com
    moved = (res.x - remove_com(starts)).norm(dim=-1).amax(-1)
    assert bool((moved <= 0.01 + 1e-12).all())
    with pytest.raises(ValueError, match="unknown minimizer 'bfgs'; valid: lbfgs, gradient-descent"):
        minimize_with(lj, starts, minimizer="bfgs")


# -- clustering -------------------------------------------------------------------------------


def test_first_representative_vs_single_linkage_on_hand_made_vectors() -> None:
    assert _labels(LINE, 1.0, "l2", "single-linkage") == [0, 0, 0, 0]
    assert _labels(LINE, 1.0, "l2", "first-representative") == [0, 0, 1, 1]
    # Order matters for the greedy rule: 0.8 first takes 0 and 1.6; 2.4 is 1.6 away, a new one.
    assert _labels(LINE[[1, 0, 2, 3]], 1.0, "l2", "first-representative") == [0, 0, 0, 1]
    # A row within eps of two representatives joins the older one, even when it is farther.
    assert _labels([[0.0], [1.5], [0.8]], 1.0, "l2", "first-representative") == [0, 1, 0]
    # The same labels when the rows are processed in chunks smaller than the set.
    assert _labels([[0.0], [1.5], [0.8]], 1.0, "l2", "first-representative", chunk_size=1) == [0, 1, 0]
    assert _labels(LINE, 1.0, "l2", "first-representative", chunk_size=3) == [0, 0, 1, 1]


def test_first_representative_matches_a_plain_loop() -> None:
    """The chunked implementation is the authors' loop: for each row, the first representative
    within eps, else a new one."""
    rows = torch.rand(300, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    for norm, p in (("l2", 2), ("l1", 1)):
        reps: list[torch.Tensor] = []
        expected = []
        for r in rows:
            hit = next((i for i, c in enumerate(reps) if float(torch.linalg.vector_norm(r - c, ord=p)) < 0.3), None)
            if hit is None:
                reps.append(r)
                hit = len(reps) - 1
            expected.append(hit)
        for chunk in (7, 64, 2048):
            assert _labels(rows, 0.3, norm, "first-representative", chunk_size=chunk) == expected


def test_l1_and_l2_thresholds() -> None:
    pair = [[0.0, 0.0], [0.6, 0.6]]  # L2 0.8485, L1 1.2
    for rule in ("single-linkage", "first-representative"):
        assert _labels(pair, 1.0, "l2", rule) == [0, 0]
        assert _labels(pair, 1.0, "l1", rule) == [0, 1]
        assert _labels(pair, 1.3, "l1", rule) == [0, 0]
        assert _labels(pair, 0.8, "l2", rule) == [0, 1]
    with pytest.raises(ValueError, match="unknown cluster norm 'l3'; valid: l2, l1"):
        distinct_minima(torch.tensor(pair), 1.0, norm="l3")
    with pytest.raises(ValueError, match="unknown cluster rule 'complete'; valid: single-linkage, first-representative"):
        distinct_minima(torch.tensor(pair), 1.0, rule="complete")


def _census(signature: torch.Tensor, eps: float, norm: str, rule: str) -> MinimaCensus:
    m = signature.shape[0]
    return MinimaCensus(n_input=m, n_nonfinite=0, n_unconverged=0, n_saddles=0, eps=eps,
                        x=torch.zeros(m, 2, 1, dtype=F64), energy=torch.arange(m, dtype=F64), signature=signature,
                        labels=distinct_minima(signature, eps, norm=norm, rule=rule), norm=norm, rule=rule)


@pytest.mark.parametrize(("signature", "norm", "rule", "counts"), [
    # (eps/2, eps, 2 eps) with eps = 1, hand-counted.
    (LINE, "l2", "single-linkage", (4, 1, 1)),
    (LINE, "l2", "first-representative", (4, 2, 2)),  # at 2: 0 takes 0.8, 1.6; 2.4 is 2.4 away
    (torch.tensor([[0.0, 0.0], [0.6, 0.6], [1.2, 1.2]], dtype=F64), "l2", "single-linkage", (3, 1, 1)),
    (torch.tensor([[0.0, 0.0], [0.6, 0.6], [1.2, 1.2]], dtype=F64), "l2", "first-representative", (3, 2, 1)),
    (torch.tensor([[0.0, 0.0], [0.6, 0.6], [1.2, 1.2]], dtype=F64), "l1", "single-linkage", (3, 3, 1)),
    (torch.tensor([[0.0, 0.0], [0.6, 0.6], [1.2, 1.2]], dtype=F64), "l1", "first-representative", (3, 3, 2)),
])
def test_recounts_at_half_and_double_eps_keep_norm_and_rule(signature, norm, rule, counts) -> None:
    census = _census(signature, 1.0, norm, rule)
    assert (census.with_eps(0.5).n_distinct, census.n_distinct, census.with_eps(2.0).n_distinct) == counts
    assert census.with_eps(2.0).norm == norm and census.with_eps(2.0).rule == rule


def test_census_with_the_paper_code_combination_counts_dw4_minima() -> None:
    """Gradient descent + L1 + first representative on DW-4 starts: the same distinct minima
    as eqbench's combination, each a known minimum; novel_minima works with either."""
    dw4 = get_system("dw4")
    starts = dw4.initial_configurations(30, torch.Generator().manual_seed(5)).to(F64)
    ours = census_of_minima(dw4, starts, eps=0.01)
    theirs = census_of_minima(dw4, starts, eps=0.01, minimizer="gradient-descent", gd_step=1e-2, max_steps=100_000,
                              norm="l1", rule="first-representative")
    assert (theirs.norm, theirs.rule) == ("l1", "first-representative")
    assert theirs.n_unconverged == 0
    torch.testing.assert_close(theirs.distinct_energies(), ours.distinct_energies(), rtol=0, atol=1e-6)
    assert not bool(novel_minima(theirs, theirs).any())


# -- settings ---------------------------------------------------------------------------------


def test_presets_resolve_and_are_reference_settings() -> None:
    dw4 = get_system("dw4")
    base = dict(plan_cells(TASK_NAME, "gaussian", "dw4", "smoke")[1].params)
    ours = Settings.resolve(base, dw4)
    assert (ours.minima_protocol, ours.minimizer, ours.cluster_norm, ours.cluster_rule) == (
        "eqbench", "lbfgs", "l2", "single-linkage")
    theirs = Settings.resolve({**base, "minima_protocol": "paper-code", "eps_l1": 0.02}, dw4)
    assert (theirs.minimizer, theirs.cluster_norm, theirs.cluster_rule, theirs.eps) == (
        "gradient-descent", "l1", "first-representative", 0.02)
    mixed = Settings.resolve({**base, "minima_protocol": "paper-code", "cluster_norm": "l2"}, dw4)
    assert (mixed.minimizer, mixed.cluster_norm, mixed.eps) == ("gradient-descent", "l2", 0.01)
    keys = {"minima_protocol", "minimizer", "max_displacement", "gd_step", "gd_max_steps", "cluster_norm",
            "cluster_rule", "eps_l1"}
    assert keys <= REFERENCE_SETTINGS
    # Reference cells record the choice, and another choice is another reference cell.
    plain = plan_cells(TASK_NAME, "gaussian", "dw4", "smoke")
    paper = plan_cells(TASK_NAME, "gaussian", "dw4", "smoke", overrides={"minima_protocol": "paper-code"})
    for cell in plain + paper:
        assert keys <= set(cell.params)
    assert not {c.cell_id for c in paper} & {c.cell_id for c in plain}


@pytest.mark.parametrize(("override", "message"), [
    ({"minima_protocol": "paper"}, r"unknown minima_protocol 'paper'; valid: eqbench, paper-code$"),
    ({"minimizer": "bfgs"}, r"unknown minimizer 'bfgs'; valid: preset, lbfgs, gradient-descent$"),
    ({"cluster_norm": "l3"}, r"unknown cluster_norm 'l3'; valid: preset, l2, l1$"),
    ({"cluster_rule": "complete"}, r"unknown cluster_rule 'complete'; valid: preset, single-linkage, "
                                   r"first-representative$"),
    ({"gd_step": 0}, r"gd_step must be a positive number"),
    ({"max_displacement": -0.1}, r"max_displacement must be a positive number"),
    ({"gd_max_steps": 0}, r"gd_max_steps must be an integer >= 1"),
    ({"eps_l1": "x"}, r"eps_l1 must be a positive number"),
])
def test_bad_minima_settings_are_refused_at_planning(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        plan_cells(TASK_NAME, "kernel-flow", "dw4", "smoke", overrides=override)
    assert "\n" not in str(err.value)


def test_smoke_dw4_with_the_paper_code_preset(tmp_path) -> None:
    """The whole task runs with the authors' minimiser and clustering; the references mean what
    they mean with eqbench's (the training set reaches the global minimum only, equilibrium
    samples several of the five minima and only those)."""
    results, _ = run_task_smoke(TASK_NAME, "gaussian", "dw4", tmp_path, overrides={"minima_protocol": "paper-code"},
                                expect_metrics=("distinct_minima", "distinct_minima_eps_half", "new_minima"))
    for cell in results:
        assert cell.config["params"]["minima_protocol"] == "paper-code"
    by = {(r.variant, r.metric): [] for c in results for r in c.records}
    for c in results:
        for r in c.records:
            by[(r.variant, r.metric)].append(r.value)
    assert by[("training", "distinct_minima")] == [1.0]
    assert by[("training", "lowest_minimum_energy")] == pytest.approx([DW4_MINIMA[0]], abs=1e-3)
    for variant in ("mcmc-short", "mcmc-long"):
        assert min(by[(variant, "distinct_minima")]) >= 3
        assert all(min(abs(e - m) for m in DW4_MINIMA) < 1e-3 for e in by[(variant, "structure_energy")])
