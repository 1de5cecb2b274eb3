"""baselines/published.csv: schema, unique keys, known ids, and spot checks of typed-in values.

The expected values below are typed from SPEC.md §6 / the paper (nothing is parsed at test
time), so a mistyped number in the CSV shows up as a disagreement between two hand copies.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

CSV = Path(__file__).resolve().parents[1] / "baselines" / "published.csv"

COLUMNS = [
    "source",
    "table",
    "system",
    "model",
    "metric",
    "value",
    "error",
    "unit",
    "convention",
    "data_set",
    "pair_counting",
    "nll_constant",
    "estimator",
    "note",
]
#: The structured convention columns the report's "Conventions of the published rows" table shows.
CONVENTION_COLUMNS = ["data_set", "pair_counting", "nll_constant", "estimator"]
ORDERED = "ordered pairs (each twice)"
UNORDERED = "unordered pairs (each once)"
#: baselines/README.md: the only values pair_counting may take.
PAIR_COUNTING = {ORDERED, UNORDERED, "n/a", "not stated"}
KEY = ["source", "table", "system", "model", "metric"]
SOURCES = {"kohler2020", "midgley2023", "satorras2021"}
#: The peers whose own tables rows may come from (baselines/README.md, "Rules for rows typed from
#: the peers' papers").
PEER_SOURCES = {"midgley2023", "satorras2021"}
SYSTEMS = {"dw2", "dw4", "lj13"}
# eqbench model ids, Table 1's reference rows, "system" for properties of the energy surface,
# and the peers' models under their eqbench ids.
MODELS = {
    "kernel-flow",
    "gradient-flow",
    "schnet-flow",
    "node",
    "real-nvp",
    "training-set",
    "mcmc-short",
    "mcmc-long",
    "system",
    # eqbench ids of the peers' models, for rows typed from the peers' own tables.
    "en-flow",
    "se3-acf",
}


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return pd.read_csv(CSV)


@pytest.fixture(scope="module")
def text_table() -> pd.DataFrame:
    """The file as strings, "n/a" kept as written (pandas would read it as missing), as the report
    reads it."""
    return pd.read_csv(CSV, dtype=str, keep_default_na=False)


def lookup(
    table: pd.DataFrame, source: str, tab: str, system: str, model: str, metric: str
) -> pd.Series:
    rows = table[
        (table.source == source)
        & (table.table == tab)
        & (table.system == system)
        & (table.model == model)
        & (table.metric == metric)
    ]
    assert len(rows) == 1, (
        f"expected one row for {(source, tab, system, model, metric)}, got {len(rows)}"
    )
    return rows.iloc[0]


def test_columns_exact(table: pd.DataFrame) -> None:
    assert list(table.columns) == COLUMNS


def test_keys_unique_and_complete(table: pd.DataFrame) -> None:
    assert not table[KEY].isna().any().any(), "key columns must not be empty"
    duplicated = table[table.duplicated(KEY, keep=False)]
    assert duplicated.empty, f"duplicate keys:\n{duplicated[KEY]}"


def test_values_numeric(table: pd.DataFrame) -> None:
    assert pd.api.types.is_float_dtype(table["value"]) or pd.api.types.is_integer_dtype(
        table["value"]
    )
    assert table["value"].map(math.isfinite).all()
    assert pd.api.types.is_float_dtype(table["error"])
    errors = table["error"].dropna()
    assert (errors >= 0).all()


def test_known_ids(table: pd.DataFrame) -> None:
    assert set(table.source) <= SOURCES
    assert set(table.system) <= SYSTEMS
    unknown = set(table.model) - MODELS
    assert not unknown, f"unknown model ids: {sorted(unknown)}"


def test_every_row_states_its_convention(table: pd.DataFrame) -> None:
    assert table["convention"].notna().all()
    assert table["note"].notna().all()


def test_table2_spot_checks(table: pd.DataFrame) -> None:
    row = lookup(
        table, "kohler2020", "Table 2", "lj13", "kernel-flow", "train_time_10_iterations_s"
    )
    assert (
        row.value == pytest.approx(0.498) and row.error == pytest.approx(0.010) and row.unit == "s"
    )
    row = lookup(
        table, "kohler2020", "Table 2", "lj13", "schnet-flow", "sample_time_10_iterations_s"
    )
    assert row.value == pytest.approx(25.400) and row.error == pytest.approx(3.690)
    row = lookup(
        table, "kohler2020", "Table 2", "dw4", "gradient-flow", "train_time_10_iterations_s"
    )
    assert row.value == pytest.approx(2.58) and row.error == pytest.approx(0.091)
    assert "ratios" in row.note
    assert (table[table.table == "Table 2"].shape[0]) == 12


def test_table1_spot_checks(table: pd.DataFrame) -> None:
    t1 = table[table.table == "Table 1"]
    assert len(t1) == 12
    row = lookup(table, "kohler2020", "Table 1", "lj13", "kernel-flow", "distinct_minima_-70_-60")
    assert (row.value, row.error) == (pytest.approx(38.30), pytest.approx(2.49))
    row = lookup(table, "kohler2020", "Table 1", "lj13", "mcmc-long", "distinct_minima_-70_-60")
    assert (row.value, row.error) == (pytest.approx(64.60), pytest.approx(6.11))
    row = lookup(table, "kohler2020", "Table 1", "lj13", "mcmc-short", "distinct_minima_-inf_-80")
    assert (row.value, row.error) == (pytest.approx(0.90), pytest.approx(0.30))
    training = t1[t1.model == "training-set"].set_index("metric")
    assert training["value"].to_dict() == {
        "distinct_minima_-70_-60": 0,
        "distinct_minima_-80_-70": 7,
        "distinct_minima_-inf_-80": 0,
    }
    assert training["error"].isna().all()


def test_other_paper_numbers(table: pd.DataFrame) -> None:
    assert lookup(
        table, "kohler2020", "§7.4", "dw4", "node", "loglik_train"
    ).value == pytest.approx(10.85)
    assert lookup(table, "kohler2020", "§7.4", "dw4", "node", "loglik_test").value == pytest.approx(
        11.40
    )
    assert (
        lookup(table, "kohler2020", "§7.5", "dw4", "kernel-flow", "distinct_minima_found").value
        == 5
    )
    assert lookup(table, "kohler2020", "§7.5", "dw4", "node", "distinct_minima_found").value == 1
    counts = {
        ("C.1", "kernel-flow"): (620, 620),
        ("C.2", "gradient-flow"): (5377, 5377),
        ("C.2", "schnet-flow"): (9857, 9857),
        ("C.3", "node"): (5256, 21671),
        ("C.5", "real-nvp"): (21576, 215680),
    }
    for (tab, model), (dw4, lj13) in counts.items():
        assert lookup(table, "kohler2020", tab, "dw4", model, "n_parameters").value == dw4
        assert lookup(table, "kohler2020", tab, "lj13", model, "n_parameters").value == lj13
    minima = [
        lookup(table, "kohler2020", "SPEC §2", "dw4", "system", f"minimum_energy_{k}").value
        for k in range(1, 6)
    ]
    assert minima == pytest.approx([-25.79, -25.31, -24.35, -23.47, -21.07])
    row = lookup(table, "kohler2020", "Fig. 7", "lj13", "system", "global_minimum_energy")
    assert row.value == pytest.approx(-83.09) and "ordered-pair" in row.convention


def test_peer_numbers(table: pd.DataFrame) -> None:
    peer = table[table.source == "midgley2023"].set_index(["system", "metric"])["value"]
    assert peer[("dw4", "nll_test")] == pytest.approx(8.61)
    assert peer[("lj13", "nll_test")] == pytest.approx(30.19)
    assert peer[("dw4", "reverse_ess")] == pytest.approx(84.29)
    assert peer[("lj13", "reverse_ess")] == pytest.approx(0.6209)
    ess = table[(table.source == "midgley2023") & (table.metric == "reverse_ess")]
    assert ess["unit"].isna().all()
    assert ess["note"].str.contains("the source gives no unit").all()


README = CSV.parent / "README.md"


def test_every_source_is_documented(table: pd.DataFrame) -> None:
    """A row whose source the README does not describe (conventions, where its numbers come
    from) cannot be read correctly."""
    text = README.read_text(encoding="utf-8")
    for source in sorted(set(table.source) | PEER_SOURCES):
        assert f"`{source}`" in text, f"baselines/README.md does not document source {source!r}"
        assert f"### {source}" in text, f"baselines/README.md has no section for source {source!r}"


def test_peer_rows_state_their_conventions(table: pd.DataFrame) -> None:
    """Rows of the peers (other data sets, other LJ energy, bounds instead of exact likelihoods)
    must say so: data set, LJ pair counting, NLL constant, estimator and K for bounds."""
    peer = table[table.source.isin(PEER_SOURCES)]
    assert not peer.empty
    for _, row in peer.iterrows():
        key = tuple(row[KEY])
        convention = str(row.convention)
        assert isinstance(row.table, str) and row.table.strip(), f"{key}: no table"
        assert "data" in convention, f"{key}: convention does not name the data set"
        if row.system == "lj13":
            assert "single-count" in convention or "ordered-pair" in convention, (
                f"{key}: LJ-13 row does not state the LJ pair counting"
            )
        if str(row.metric).startswith("nll"):
            assert "constant" in convention, f"{key}: NLL row does not state the Gaussian constant"
        text = f"{convention} {row.note}".lower()
        if "bound" in text or "importance-weighted" in text or "importance weighted" in text:
            assert "K = " in convention, f"{key}: a bound / IW estimate without its K"
        if row.table != "summary":
            # typed from the paper's own table: the note quotes where.
            assert row.table in str(row.note), f"{key}: note does not quote {row.table!r}"


def test_peer_lj13_rows_keep_single_count_label(table: pd.DataFrame) -> None:
    """The SE(3)-ACF code's LJ-13 energy is the single-count sum (baselines/README.md): its LJ-13
    ESS rows target another density than eqbench's and must keep saying so."""
    rows = table[(table.source == "midgley2023") & (table.system == "lj13")]
    assert not rows.empty
    assert rows.convention.str.contains("single-count").all()


def test_midgley_table_nll_rows_are_marked_as_iw_estimates(table: pd.DataFrame) -> None:
    """NLLs typed from Midgley et al.'s tables are importance-weighted estimates with K = 20
    (authors' code, training.K_marginal_log_lik); a row that lost this would read as an exact NLL."""
    rows = table[
        (table.source == "midgley2023")
        & (table.table != "summary")
        & table.metric.astype(str).str.startswith("nll")
    ]
    for _, row in rows.iterrows():
        assert "K = 20" in str(row.convention), f"{tuple(row[KEY])}: K = 20 not stated"



# -- the structured conventions (issue 16, item 5) ------------------------------------------------


def test_every_row_fills_the_structured_conventions(text_table: pd.DataFrame) -> None:
    """Every row states data set, pair counting, NLL constant and estimator; "n/a" or "not stated"
    where nothing else can be said, never an empty cell."""
    from eqbench.report import BASELINE_COLUMNS, CONVENTION_COLUMNS as REPORTED

    assert list(BASELINE_COLUMNS) == COLUMNS, "report.BASELINE_COLUMNS disagrees with the file's schema"
    assert list(REPORTED) == CONVENTION_COLUMNS
    for column in CONVENTION_COLUMNS:
        assert column in text_table.columns, f"published.csv lacks {column!r}"
        empty = text_table[text_table[column].str.strip() == ""]
        assert empty.empty, f"{column} empty for {[tuple(r) for r in empty[KEY].values]}"


def test_pair_counting_vocabulary(text_table: pd.DataFrame) -> None:
    unknown = set(text_table.pair_counting) - PAIR_COUNTING
    assert not unknown, f"pair_counting outside {sorted(PAIR_COUNTING)}: {sorted(unknown)}"
    # an energy enters these numbers: energy bins, minimum energies, minimisation, an ESS
    energy = text_table.metric.str.contains("minim|energy|ess")
    assert (text_table[energy].pair_counting != "n/a").all()
    # and none enters an NLL, a timing or a parameter count
    none = text_table.metric.str.startswith(("nll", "loglik", "n_parameters", "train_time", "sample_time"))
    assert (text_table[none].pair_counting == "n/a").all()


def test_kohler_lj13_rows_count_ordered_pairs(text_table: pd.DataFrame) -> None:
    """Table 1's energy bins and Fig. 7's -83.09 use the ordered-pair LJ energy (SPEC §2)."""
    rows = text_table[(text_table.source == "kohler2020") & (text_table.system == "lj13")]
    with_energy = rows[rows.pair_counting != "n/a"]
    assert set(with_energy.table) == {"Table 1", "Fig. 7"}
    assert len(with_energy) == 13
    assert (with_energy.pair_counting == ORDERED).all()


def test_dw4_energies_count_unordered_pairs(text_table: pd.DataFrame) -> None:
    """The double well sums over i < j (SPEC §2; the paper's 1/(2τ) Σ_{i,j})."""
    rows = text_table[(text_table.system == "dw4") & (text_table.pair_counting != "n/a")]
    assert not rows.empty
    assert (rows.pair_counting == UNORDERED).all()
    assert set(rows[rows.source == "kohler2020"].table) == {"SPEC §2", "§7.5"}


def test_peer_lj13_rows_name_the_enf_data_set(text_table: pd.DataFrame) -> None:
    rows = text_table[(text_table.source == "midgley2023") & (text_table.system == "lj13")]
    assert len(rows) == 2
    assert rows.data_set.str.contains("E-NF data sets").all()
    assert rows.data_set.str.contains("idx_LJ13").all()
    nll = rows[rows.metric == "nll_test"].iloc[0]
    assert nll.data_set.startswith("E-NF data sets")
    assert nll.pair_counting == "n/a", "no energy enters an NLL"
    # the ESS row's flow: the summary gives no training setup, so the data set is not stated
    ess = rows[rows.metric == "reverse_ess"].iloc[0]
    assert ess.data_set.startswith("not stated")
    assert ess.pair_counting == UNORDERED, "their LJ-13 energy is single-count"


def test_nll_constant_and_estimator(text_table: pd.DataFrame) -> None:
    nll = text_table.metric.str.startswith(("nll", "loglik"))
    assert text_table.nll_constant.str.startswith(("included", "omitted", "not stated", "n/a")).all()
    assert (text_table[~nll].nll_constant == "n/a").all()
    assert (text_table[nll].nll_constant != "n/a").all()
    peer = text_table[nll & (text_table.source == "midgley2023")]
    assert peer.nll_constant.str.startswith("included").all()
    assert peer.estimator.str.startswith("importance-weighted, K = 20").all()
    # §7.4: the paper says neither the sign nor the constant
    kohler = text_table[nll & (text_table.source == "kohler2020")]
    assert len(kohler) == 2 and kohler.nll_constant.str.startswith("not stated").all()
    timings = text_table[text_table.unit == "s"]
    assert timings.estimator.str.startswith("wall clock").all()
    counts = text_table[text_table.metric == "n_parameters"]
    assert counts.estimator.str.startswith("count").all() and (counts.data_set == "n/a").all()
