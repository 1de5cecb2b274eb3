"""Training loss by iteration of se3-acf LJ-13 energy-training cells, with and without the gradient guard.

The loss is the training estimator of KL(q‖p) - log Z (mean of u + log q over one batch of 64, kT),
read from a finished cell's JSON (its `kl_loss` records, every 10th iteration) or from a CSV written by
extract.py (a failed cell, whose JSON has no history).

A label's "seed N" picks its colour; labels with "guard" are drawn solid, the others dashed.

Usage: python plot_energy.py OUT.png "LABEL::cell.json|history.csv" ...
"""
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from eqbench.records import CellResult


def loss_history(path: str) -> pd.DataFrame:
    if path.endswith(".csv"):
        d = pd.read_csv(path)
        return d[["iteration", "loss"]]
    cell = CellResult.from_dict(json.loads(Path(path).read_text()))
    rows = [(r.step, r.value) for r in cell.records if r.metric == "kl_loss" and r.step is not None]
    return pd.DataFrame(rows, columns=["iteration", "loss"])


out, *pairs = sys.argv[1:]
fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
for pair in pairs:
    label, path = pair.split("::", 1)
    d = loss_history(path)
    seed = re.search(r"seed (\d+)", label)
    color = f"C{seed.group(1)}" if seed else None
    ax.plot(d["iteration"], d["loss"], label=label, color=color, ls="-" if "guard" in label else "--", lw=1.1)
ax.set_yscale("symlog", linthresh=100)
ax.set_xlabel("iteration (reverse KL, lr 2e-4, batch 64)")
ax.set_ylabel("training loss: mean u + log q (kT)")
ax.legend(fontsize=8)
ax.set_title("se3-acf, LJ-13 energy-training (quick, kl_energy_cut = 1000)", fontsize=10)
fig.savefig(out, dpi=110)
print("->", out)
