"""The report never averages different settings (issue "Every number means one thing", items 1, 9).

Small results tables are built by hand (one ``results.csv`` per test, with the columns
:meth:`eqbench.records.CellStore.collect` writes), so each test states exactly which cells share a
settings key (the cell config without its seed) and which do not.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from eqbench import report
from eqbench.tasks.reporting import with_settings
from conftest import report_cell, write_results

EQ = "cnf;equivariant;trainable"
NEQ = "cnf;trainable"


cell = report_cell
write = write_results


def verdicts(results: Path) -> dict[tuple[str, str], report.ClaimVerdict]:
    table = pd.read_csv(results / "results.csv")
    return {(cv.claim.key, cv.profile): cv for cv in report.evaluate_claims(table, report.load_baselines())}


def section(html: str, task: str, profile: str | None = None) -> str:
    part = html.split(f'id="task-{task}"')[1].split("</section>")[0]
    if profile is not None:
        part = part.split(f'id="task-{task}-{profile}"')[1].split("<h3")[0]
    return part


def bg_cell(model: str, profile: str, seed: int, rw: float, ess: float, *, caps: str = EQ,
            variant: str = "", hist: bool = False) -> list[dict[str, Any]]:
    values = [("mean_energy_reweighted", rw), ("mean_energy_reweighted_std", 0.05),
              ("mean_energy_mcmc", -22.5), ("mean_energy_mcmc_std", 0.05), ("ess_fraction", ess),
              ("mean_energy_flow", rw + 1.0)]
    if hist:
        edges = [-26.0, -24.0, -22.0, -20.0, -18.0]
        values += [("energy_edge", e, i) for i, e in enumerate(edges)]
        for name, dens in (("mcmc", [0.1, 0.2, 0.15, 0.05]), ("flow", [0.05, 0.2, 0.2, 0.05]),
                           ("reweighted", [0.1, 0.19, 0.16, 0.05])):
            values += [(f"energy_hist_{name}", d, i) for i, d in enumerate(dens)]
    return cell("bg-reweighting", model, "dw4", profile, seed, values, caps=caps, variant=variant)


# -- profiles are never averaged ------------------------------------------------------------------


def test_smoke_and_quick_cells_are_not_averaged(tmp_path: Path) -> None:
    """A smoke cell at -10 and a quick cell at -22.5 of the same model used to show as
    "-16.25 ± 8.8, not reproduced"; now the quick number shows unchanged and decides alone."""
    results = write(tmp_path, bg_cell("kernel-flow", "smoke", 0, -10.0, 0.01),
                    bg_cell("kernel-flow", "quick", 0, -22.5, 0.6),
                    bg_cell("node", "quick", 0, -21.0, 0.02, caps=NEQ))
    html = report.render_report(results)
    assert "-16.25" not in html and "± 8.8" not in html
    quick = section(html, "bg-reweighting", "quick")
    assert "-22.5" in quick and "-10" not in quick
    smoke = section(html, "bg-reweighting", "smoke")
    assert "-10" in smoke and "give no verdict" in smoke
    v = verdicts(results)
    assert v[("reweighting", "quick")].result.verdict == report.REPRODUCED
    assert "quick profile" in v[("reweighting", "quick")].result.evidence
    assert "1 seed" in v[("reweighting", "quick")].result.evidence
    assert v[("reweighting", "smoke")].result.verdict == report.NO_VERDICT
    assert "no verdict (smoke profile)" in html


def test_only_smoke_rows_give_no_verdict(tmp_path: Path) -> None:
    results = write(tmp_path, bg_cell("kernel-flow", "smoke", 0, -22.5, 0.6),
                    bg_cell("node", "smoke", 0, -21.0, 0.02, caps=NEQ))
    v = verdicts(results)
    assert [k for k in v if k[0] == "reweighting"] == [("reweighting", "smoke")]
    assert v[("reweighting", "smoke")].verdict_text == "no verdict (smoke profile)"


# -- settings keys ----------------------------------------------------------------------------------


def test_runs_differing_in_one_setting_are_two_rows(tmp_path: Path) -> None:
    """Two runs that differ only in ``lr`` used to show as one row with "repeats = 2"."""
    results = write(tmp_path,
                    cell("density-estimation", "kernel-flow", "dw4", "quick", 0, [("nll_test", 10.0)], lr=0.001),
                    cell("density-estimation", "kernel-flow", "dw4", "quick", 0, [("nll_test", 14.0)], lr=0.005))
    agg = report.aggregate(with_settings(pd.read_csv(results / "results.csv")), ["nll_test"])
    assert sorted(agg["settings"]) == ["lr=0.001", "lr=0.005"]
    assert list(agg["n_seeds"]) == [1, 1] and sorted(agg["mean"]) == [10.0, 14.0]
    table = section(report.render_report(results), "density-estimation", "quick")
    rows = re.findall(r"<tr>(.*?)</tr>", table.split('<table class="results">')[1].split("</table>")[0], re.S)
    body = [r for r in rows if "<td>" in r]
    assert len(body) == 2
    assert "<td>lr=0.001</td>" in body[0] + body[1] and "<td>lr=0.005</td>" in body[0] + body[1]
    assert all(r.rstrip().endswith("<td>1</td>") for r in body), "seeds column: 1 each"
    assert "<th>seeds</th>" in table and "<th>settings</th>" in table


def test_n_parameters_of_three_training_sizes_are_three_rows(tmp_path: Path) -> None:
    """``make demo`` showed the kernel flow's 620 parameters as "620 ± 0, repeats 3"."""
    results = write(tmp_path, *[cell("density-estimation", "kernel-flow", "dw4", "quick", 0,
                                     [("n_parameters", 620.0), ("nll_test", 12.0)], n_train=n)
                                for n in (10, 100, 1000)])
    agg = report.aggregate(with_settings(pd.read_csv(results / "results.csv")), ["n_parameters"])
    assert len(agg) == 3 and list(agg["n_seeds"]) == [1, 1, 1] and list(agg["n"]) == [1, 1, 1]
    assert sorted(agg["n_train"].astype(int)) == [10, 100, 1000]
    assert set(agg["settings"]) == {""}, "only n_train differs, and it has its own column"
    html = report.render_report(results)
    assert "620 ± 0" not in html
    side = section(html, "density-estimation", "quick").split("Side by side")[1].split("</table>")[0]
    assert side.count("kernel-flow → kernel-flow") == 3


def test_peer_nll_sits_beside_the_cells_at_the_peers_training_size(tmp_path: Path) -> None:
    """midgley2023's se3-acf test NLL (n = 1,000) is paired with the se3-acf cells at n_train = 1,000
    only, never with an average over sizes, and not with another model."""
    cells = [cell("density-estimation", "se3-acf", "dw4", "quick", s, [("nll_test", 10.0 + s + n / 1000)],
                  n_train=n) for n in (10, 1000) for s in range(3)]
    cells.append(cell("density-estimation", "kernel-flow", "dw4", "quick", 0, [("nll_test", 20.0)]))
    side = section(report.render_report(write(tmp_path, *cells)), "density-estimation", "quick")
    side = side.split("Side by side")[1].split("</table>")[0]
    rows = [r for r in re.findall(r"<tr>(.*?)</tr>", side, re.S) if "se3-acf → se3-acf" in r]
    assert len(rows) == 1, "one row: the n_train = 1,000 key"
    assert "<td>1000</td>" in rows[0] and "<td>12 ± 1</td>" in rows[0] and "<td>8.61</td>" in rows[0]
    assert "kernel-flow → " not in side.replace("kernel-flow → kernel-flow", "")


def test_a_training_target_setting_is_named_even_on_a_row_of_its_own(tmp_path: Path) -> None:
    """kl_energy_cut changes what the flow is trained towards: a lone row that used it says so,
    one at the paper's value ("off") or from before the setting existed does not."""
    results = write(tmp_path,
                    cell("bg-reweighting", "real-nvp", "lj55", "quick", 0, [("ess_fraction", 0.001)],
                         kl_energy_cut=1000),
                    cell("bg-reweighting", "kernel-flow", "lj55", "quick", 0, [("ess_fraction", 0.002)],
                         kl_energy_cut="off"),
                    cell("bg-reweighting", "kernel-flow", "lj13", "quick", 0, [("ess_fraction", 0.3)]))
    table = with_settings(pd.read_csv(results / "results.csv"))
    label = dict(zip(table["model"] + "/" + table["system"], table["settings"]))
    assert label == {"real-nvp/lj55": "kl_energy_cut=1000", "kernel-flow/lj55": "", "kernel-flow/lj13": ""}


def test_seeds_of_one_settings_key_are_averaged(tmp_path: Path) -> None:
    results = write(tmp_path, *[cell("density-estimation", "kernel-flow", "dw4", "quick", s, [("nll_test", v)])
                                for s, v in enumerate([10.0, 12.0, 14.0])])
    agg = report.aggregate(with_settings(pd.read_csv(results / "results.csv")), ["nll_test"])
    assert len(agg) == 1 and agg.iloc[0]["mean"] == pytest.approx(12.0) and agg.iloc[0]["n_seeds"] == 3


def test_older_table_without_settings_columns(tmp_path: Path) -> None:
    """Tables collected before ``settings_key`` / ``capabilities`` existed: keys are derived from
    ``config_json`` (profiles still apart), capability claims say capabilities are not recorded."""
    results = write(tmp_path, bg_cell("kernel-flow", "smoke", 0, -10.0, 0.01),
                    bg_cell("kernel-flow", "quick", 0, -22.5, 0.6))
    table = pd.read_csv(results / "results.csv").drop(columns=["settings_key", "capabilities"])
    table.to_csv(results / "results.csv", index=False)
    derived = with_settings(table)
    assert derived["settings_key"].nunique() == 2
    assert set(derived["settings_key"].str.len()) == {16}
    v = verdicts(results)
    assert v[("reweighting", "quick")].result.verdict == report.NOT_MEASURED
    assert "capabilities not recorded" in v[("reweighting", "quick")].result.evidence
    assert "-16.25" not in report.render_report(results)


# -- claims -------------------------------------------------------------------------------------------


def _generalisation_cells(profile: str, eq_model: str, eq_test: list[float], seeds_neq: int = 1) -> list:
    cells = []
    for s, v in enumerate(eq_test):
        cells.append(cell("density-estimation", eq_model, "dw4", profile, s,
                          [("nll_test", v), ("nll_train", v - 0.5)], n_train=10))
    for variant, test in (("", 40.0), ("aug", 25.0)):
        for s in range(seeds_neq):
            cells.append(cell("density-estimation", "node", "dw4", profile, s,
                              [("nll_test", test), ("nll_train", 8.0)], n_train=10, caps=NEQ, variant=variant))
    return cells


def test_claim_judged_per_profile_with_seeds_and_spread(tmp_path: Path) -> None:
    results = write(tmp_path, *_generalisation_cells("quick", "kernel-flow", [10.0, 11.0, 12.0]),
                    *_generalisation_cells("paper", "kernel-flow", [30.0]))
    v = verdicts(results)
    quick, paper = v[("generalisation", "quick")].result, v[("generalisation", "paper")].result
    assert quick.verdict == report.REPRODUCED and paper.verdict == report.NOT_REPRODUCED
    assert quick.evidence.startswith("quick profile:") and paper.evidence.startswith("paper profile:")
    assert "11 ± 1 (3 seeds, 10…12)" in quick.evidence, quick.evidence
    assert "30 (1 seed)" in paper.evidence
    assert re.search(r"kernel-flow \[[0-9a-f]{8}\]", quick.evidence), "names the settings key it rests on"
    assert len(quick.points) == 3 and quick.points[0].n_seeds == 3
    html = report.render_report(results)
    claims = html.split('id="claims"')[1].split("</section>")[0]
    assert 'id="claim-figure-generalisation-quick"' in claims and 'id="claim-figure-generalisation-paper"' in claims
    assert claims.index("<svg") < claims.index('<table class="claims">'), "figures come first"


def test_new_equivariant_model_is_judged_by_capability(tmp_path: Path) -> None:
    """A model id the report has never heard of, with capability 'equivariant', gets a verdict."""
    good = write(tmp_path, *_generalisation_cells("quick", "my-eq-flow", [10.0]))
    res = verdicts(good)[("generalisation", "quick")].result
    assert res.verdict == report.REPRODUCED and "my-eq-flow" in res.evidence
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = write(bad_dir, *_generalisation_cells("quick", "my-eq-flow", [30.0]))
    res = verdicts(bad)[("generalisation", "quick")].result
    assert res.verdict == report.NOT_REPRODUCED and "my-eq-flow" in res.evidence


def test_dw4_minima_judges_every_equivariant_model(tmp_path: Path) -> None:
    def minima(model: str, counts: list[int], caps: str = EQ) -> list:
        return cell("metastable-states", model, "dw4", "quick", 0,
                    [("distinct_minima", c, r) for r, c in enumerate(counts)], caps=caps, variant="flow")

    results = write(tmp_path, minima("kernel-flow", [5, 5]), minima("my-eq-flow", [5, 4]), minima("node", [1, 1], NEQ))
    res = verdicts(results)[("dw4-minima", "quick")].result
    assert res.verdict == report.NOT_REPRODUCED
    assert "my-eq-flow" in res.evidence and "kernel-flow" in res.evidence and "node" in res.evidence
    assert {p.published for p in res.points} == {5.0, 1.0}


def test_exact_divergence_applies_to_every_cnf(tmp_path: Path) -> None:
    def rmse(model: str, exact: float, hutch: float, caps: str) -> list:
        return cell("bg-reweighting", model, "dw2", "quick", 0, [("free_energy_rmse_reweighted", exact),
                                                                 ("free_energy_rmse_hutchinson", hutch)], caps=caps)

    results = write(tmp_path, rmse("kernel-flow", 0.2, 2.0, EQ), rmse("node", 0.3, 1.0, NEQ),
                    rmse("real-nvp", 5.0, 1.0, "trainable"))
    res = verdicts(results)[("exact-divergence", "quick")].result
    assert res.verdict == report.REPRODUCED, res.evidence
    assert "node" in res.evidence and "real-nvp" not in res.evidence


# -- figures ------------------------------------------------------------------------------------------


def test_bg_histograms_drawn_per_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Smoke and quick cells of one model in one directory used to pool into one empty panel."""
    from matplotlib.axes import Axes

    from eqbench.plots import write_task_plots

    drawn: list[int] = []
    original = Axes.stairs

    def counting(self, values, edges=None, **kwargs):
        drawn.append(len(values))
        return original(self, values, edges, **kwargs)

    monkeypatch.setattr(Axes, "stairs", counting)
    results = write(tmp_path, bg_cell("kernel-flow", "smoke", 0, -10.0, 0.01, hist=True),
                    bg_cell("kernel-flow", "quick", 0, -22.5, 0.6, hist=True))
    paths = write_task_plots("bg-reweighting", results, table=pd.read_csv(results / "results.csv"))
    names = sorted(p.name for p in paths)
    assert names == ["energy_histograms_dw4_quick.png", "energy_histograms_dw4_quick.svg",
                     "energy_histograms_dw4_smoke.png", "energy_histograms_dw4_smoke.svg"]
    assert drawn == [4] * 6, "three histograms (MCMC, flow, reweighted) in each profile's figure"


def test_closed_form_gaussian_does_not_decide_a_claim_about_flows(tmp_path: Path) -> None:
    """The Gaussian baseline is equivariant but not trained: its NLL (worse than node-aug here)
    must neither sink nor carry the verdict on equivariant *flows*."""
    gaussian = cell("density-estimation", "gaussian", "dw4", "quick", 0, [("nll_test", 30.0), ("nll_train", 29.9)],
                    n_train=10, caps="equivariant;exact-density")
    results = write(tmp_path, *_generalisation_cells("quick", "kernel-flow", [10.0]), gaussian)
    res = verdicts(results)[("generalisation", "quick")].result
    assert res.verdict == report.REPRODUCED, res.evidence
    only_gaussian = tmp_path / "g"
    only_gaussian.mkdir()
    cells = [c for c in _generalisation_cells("quick", "kernel-flow", [10.0]) if c[0]["model"] == "node"]
    res = verdicts(write(only_gaussian, *cells, gaussian))[("generalisation", "quick")].result
    assert res.verdict == report.NOT_MEASURED
