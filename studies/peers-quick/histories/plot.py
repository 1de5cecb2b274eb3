"""Training NLL and gradient norm by iteration of se3-acf LJ-13 bg-reweighting cells (histories/*.csv).

Usage: python plot.py OUT.png "LABEL::history.csv" ...
"""
import sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
out, *pairs = sys.argv[1:]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
for pair in pairs:
    label, path = pair.split("::", 1)
    d = pd.read_csv(path)
    step = d["iteration"] + (d["phase"] == "lambda-mix") * 500
    axes[0].plot(step, d["nll"], label=label)
    axes[1].plot(step, d["grad_norm"], label=label)
for ax, name in zip(axes, ("training NLL (one batch, nats)", "gradient norm before clipping")):
    ax.set_yscale("log"); ax.set_xlabel("iteration (ML 0-499, then λ-mix 0 → 0.5)"); ax.set_ylabel(name)
    ax.axvline(500, color="grey", lw=0.8, ls=":")
axes[0].legend(fontsize=8)
fig.suptitle("se3-acf, LJ-13 bg-reweighting (quick, kl_energy_cut = 1000, seed 1)", fontsize=10)
fig.savefig(out, dpi=110)
print("->", out)
