"""Write the training history of a cell's fits as CSV, from the final snapshots the cell leaves while it
scores (copied aside before the cell finishes and removes them) or, for a failed cell, keeps.

A bg-reweighting cell has two fits (maximum likelihood, then the λ-mix); an energy-training cell has
one (reverse KL).

Usage: python extract.py OUT.csv CELL_ID fit-0.pt [fit-1.pt]
"""
import csv, sys, torch
out, cell, *files = sys.argv[1:]
rows = []
phases = ("ml", "lambda-mix") if len(files) == 2 else ("reverse-kl",)
for phase, f in zip(phases, files):
    s = torch.load(f, weights_only=False, map_location="cpu")
    r = s["result"]
    for e in r.history:
        rows.append({"cell": cell, "phase": phase, **{k: e.get(k) for k in ("iteration", "lambda", "loss", "nll", "kl", "grad_norm", "skipped_steps", "wall_s")}})
with open(out, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
print(len(rows), "rows ->", out)
