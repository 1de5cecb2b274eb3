"""The report's "Standard metrics" tables (issue 16, item 6): one row per settings key, mean ± std
across its seeds, never across settings keys or profiles; the peers' published numbers beside.

Results tables are built by hand (as in tests/test_report_settings.py), so each test states which
cells share a settings key (the cell config without its seed) and which do not.
"""

from __future__ import annotations

import functools

from pathlib import Path
from typing import Any

import pandas as pd

from eqbench import report
from eqbench.standard_metrics_table import StandardMetricsBlock, standard_metrics
from eqbench.tasks.reporting import HtmlTable, with_settings
from conftest import report_cell, write_results

EQ = "cnf;equivariant;trainable"
NEQ = "cnf;trainable"
EXACT = "nats, exact"
IW20 = "nats, IW estimate K=20"


cell = functools.partial(report_cell, third="unit")
write = write_results


def density(model: str, profile: str, seed: int, nll: float, *, unit: str = EXACT, system: str = "dw4",
            extra: tuple = (), **kw: Any) -> list[dict[str, Any]]:
    return cell("density-estimation", model, system, profile, seed, [("nll_test", nll, unit), *extra], **kw)


def blocks(results: Path) -> dict[tuple[str, str], StandardMetricsBlock]:
    ok = with_settings(pd.read_csv(results / "results.csv"))
    return {(b.profile, b.system): b for b in standard_metrics(ok, report.load_baselines())}


def table_of(block: StandardMetricsBlock, task: str) -> HtmlTable:
    found = [t for t in block.tables if f"— {task}:" in t.caption]
    assert len(found) == 1, [t.caption for t in block.tables]
    return found[0]


def units_of(block: StandardMetricsBlock, task: str) -> HtmlTable:
    found = [t for t in block.tables if t.caption.startswith(f"Units of the {block.system} {task} table")]
    assert len(found) == 1, [t.caption for t in block.tables]
    return found[0]


def column(table: HtmlTable, metric: str) -> int:
    hits = [i for i, h in enumerate(table.header) if h == metric or h.startswith(f"{metric} (")]
    assert len(hits) == 1, (metric, table.header)
    return hits[0]


def measured(table: HtmlTable, model: str) -> list[list[str]]:
    return [r for r in table.rows if r[0] == model and not r[2].startswith("published")]


# -- one row per settings key, mean ± std across seeds ---------------------------------------------


def test_one_row_per_model_with_mean_std_and_seeds(tmp_path: Path) -> None:
    """Three kernel-flow seeds at n_train = 1,000 are one row "12 ± 2", seeds 3; the se3-acf's IW
    estimate keeps its unit; a cell at n_train = 10 is not a standard-metric row."""
    cells = [density("kernel-flow", "quick", s, v) for s, v in enumerate([10.0, 12.0, 14.0])]
    cells += [density("se3-acf", "quick", s, v, unit=IW20) for s, v in enumerate([9.0, 11.0])]
    cells.append(density("kernel-flow", "quick", 0, 50.0, n_train=10))
    t = table_of(blocks(write(tmp_path, *cells))[("quick", "dw4")], "density-estimation")
    nll, seeds = column(t, "nll_test"), t.header.index("seeds")
    (kf,) = measured(t, "kernel-flow")
    (acf,) = measured(t, "se3-acf")
    assert kf[nll] == "12 ± 2 (exact)" and kf[seeds] == "3"
    assert acf[nll] == "10 ± 1.4 (IW estimate K=20)" and acf[seeds] == "2"
    assert not any("50" in c for r in t.rows for c in r), "n_train = 10 is not the peers' training size"
    assert "n_train = 1,000 only" in t.caption


def test_two_lr_settings_stay_two_rows(tmp_path: Path) -> None:
    """Two settings keys differing only in lr: two rows, each averaged over its own seeds only."""
    cells = [density("kernel-flow", "quick", s, v, lr=0.001) for s, v in enumerate([10.0, 11.0])]
    cells += [density("kernel-flow", "quick", s, v, lr=0.005) for s, v in enumerate([20.0, 22.0])]
    t = table_of(blocks(write(tmp_path, *cells))[("quick", "dw4")], "density-estimation")
    rows = measured(t, "kernel-flow")
    nll = column(t, "nll_test")
    assert [(r[2], r[nll], r[t.header.index("seeds")]) for r in rows] == [
        ("lr=0.001", "10.5 ± 0.71 (exact)", "2"), ("lr=0.005", "21 ± 1.4 (exact)", "2")]
    assert not any("15.75" in c or "16" in c for r in rows for c in r), "never averaged across settings"


def test_profiles_are_separate_blocks_and_smoke_gives_no_verdict(tmp_path: Path) -> None:
    results = write(tmp_path, density("kernel-flow", "quick", 0, 10.0), density("kernel-flow", "smoke", 0, 40.0))
    b = blocks(results)
    assert set(b) == {("quick", "dw4"), ("smoke", "dw4")}
    quick, smoke = table_of(b[("quick", "dw4")], "density-estimation"), table_of(b[("smoke", "dw4")],
                                                                                 "density-estimation")
    nll = column(quick, "nll_test")
    assert [r[nll] for r in measured(quick, "kernel-flow")] == ["10 (exact)"]
    assert [r[nll] for r in measured(smoke, "kernel-flow")] == ["40 (exact)"]
    assert "smoke profile: no verdict" in smoke.caption and "no verdict" not in quick.caption
    assert b[("smoke", "dw4")].verdict_note and not b[("quick", "dw4")].verdict_note
    assert not any("25" in c for blk in b.values() for t in blk.tables for r in t.rows for c in r)


def test_missing_metric_is_a_dash_and_unrecorded_columns_are_named(tmp_path: Path) -> None:
    cells = [density("kernel-flow", "quick", s, 10.0 + s,
                     extra=(("kl_test", 1.0 + s, "nats, KL(p‖q)"), ("kl_test_stderr", 0.1 + 0.1 * s, "nats, SE"),
                            ("energy_w2_flow", 0.5, "kT, W2")))
             for s in range(2)]
    cells.append(density("node", "quick", 0, 30.0, caps=NEQ, extra=(("energy_w2_flow", 0.0, "kT, W2"),)))
    t = table_of(blocks(write(tmp_path, *cells))[("quick", "dw4")], "density-estimation")
    (kf,), (node,) = measured(t, "kernel-flow"), measured(t, "node")
    kl, se, w2 = column(t, "kl_test"), column(t, "kl_test_stderr"), column(t, "energy_w2_flow")
    assert kf[kl] == "1.5 ± 0.71" and kf[se] == "0.15", "typical SE: the mean over seeds"
    assert node[kl] == "–" and node[se] == "–"
    assert node[w2] == "0", "a measured zero is a number, not a dash"
    assert "coord_w2_aligned_flow" in t.caption and not any(h.startswith("coord_w2") for h in t.header)


def test_units_that_differ_within_a_column_are_marked(tmp_path: Path) -> None:
    """Reverse ESS of 1,000 vs 500 flow samples: two units in one column, each value marked."""
    ess = "fraction of all samples drawn; reverse ESS of the {} flow samples"
    cells = [cell("energy-training", "kernel-flow", "lj13", "quick", s,
                  [("ess_fraction", 0.2 + 0.1 * s, ess.format(1000)), ("reverse_kl", 3.0, "nats")],
                  n_train=None, n_samples=1000) for s in range(2)]
    cells.append(cell("energy-training", "kernel-flow", "lj13", "quick", 0,
                      [("ess_fraction", 0.9, ess.format(500))], n_train=None, n_samples=500))
    blk = blocks(write(tmp_path, *cells))[("quick", "lj13")]
    t, u = table_of(blk, "energy-training"), units_of(blk, "energy-training")
    col, rkl = column(t, "ess_fraction"), column(t, "reverse_kl")
    values = sorted(r[col] for r in measured(t, "kernel-flow"))
    assert values == ["0.25 ± 0.071 [a]", "0.9 [b]"], values
    assert sorted(r[rkl] for r in measured(t, "kernel-flow")) == ["3 ± 0", "–"]
    assert [r[1:] for r in u.rows if r[0].startswith("ess_fraction") and r[1] in "ab"] == [
        ["a", ess.format(1000)], ["b", ess.format(500)]]


# -- published numbers beside ------------------------------------------------------------------------


def test_published_nll_and_ess_sit_beside_with_their_convention(tmp_path: Path) -> None:
    cells = [density("se3-acf", "quick", 0, 9.0, unit=IW20), density("se3-acf", "quick", 0, 31.0, unit=IW20,
                                                                     system="lj13"),
             cell("energy-training", "se3-acf", "dw4", "quick", 0, [("ess_fraction", 0.5, "fraction")], n_train=None)]
    b = blocks(write(tmp_path, *cells))
    dw4 = table_of(b[("quick", "dw4")], "density-estimation")
    nll = column(dw4, "nll_test")
    (pub,) = [r for r in dw4.rows if r[2].startswith("published")]
    assert pub[0] == "se3-acf" and pub[2] == "published: midgley2023, summary" and pub[nll] == "8.61"
    assert "importance-weighted estimate with K = 20" in pub[-1] and "unit: nats" in pub[-1]
    assert [c for i, c in enumerate(pub) if i not in (0, 2, nll, len(pub) - 1)] == ["", "–"], "variant, seeds"
    lj13 = table_of(b[("quick", "lj13")], "density-estimation")
    assert [r[column(lj13, "nll_test")] for r in lj13.rows if r[2].startswith("published")] == ["30.19"]
    et = table_of(b[("quick", "dw4")], "energy-training")
    (ess,) = [r for r in et.rows if r[2].startswith("published")]
    assert ess[column(et, "ess_fraction")] == "84.29"
    assert "ESS definition and scale not stated" in ess[-1] and "unit: none stated in the source" in ess[-1]
    assert [r[2] for r in units_of(b[("quick", "dw4")], "energy-training").rows if r[1].startswith("published")] == [
        "none stated in the source"]


# -- the page ----------------------------------------------------------------------------------------


def test_section_on_the_page_after_the_claims(tmp_path: Path) -> None:
    cells = [density("kernel-flow", "quick", s, v) for s, v in enumerate([10.0, 12.0, 14.0])]
    cells.append(density("kernel-flow", "smoke", 0, 40.0))
    html = report.render_report(write(tmp_path, *cells))
    assert html.index('id="claims"') < html.index('id="standard-metrics"') < html.index('id="failed-cells"')
    part = html.split('<section id="standard-metrics">')[1].split("</section>")[0]
    assert "<h2>Standard metrics</h2>" in part
    quick = part.split('id="standard-metrics-quick"')[1].split('id="standard-metrics-smoke"')[0]
    smoke = part.split('id="standard-metrics-smoke"')[1]
    assert "<td>12 ± 2 (exact)</td>" in quick and "40" not in quick
    assert "<td>40 (exact)</td>" in smoke and "smoke: no verdict" in smoke
    assert "<td>8.61</td>" in quick and "midgley2023" in quick
