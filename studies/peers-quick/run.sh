#!/usr/bin/env bash
# The quick-profile study of the peer families (README "The architectures the field compares
# against"), cells in studies/peers-quick/cells/. The cells were made by eqbench at commit
# 10946e0: a cell's id hashes eqbench's source, so to add seeds or sizes to THESE cells (and have
# them aggregate with them) run from a worktree of that commit:
#
#   git worktree add ../eqbench-10946e0 10946e0
#   cd ../eqbench-10946e0 && PYTHONPATH=$PWD RESULTS=<repo>/studies/peers-quick bash <repo>/studies/peers-quick/run.sh
#
# Rerunning skips finished cells (resumable). Newer code makes new cells, which the report keeps
# apart (their code version differs). One thread per cell; --jobs as the cores allow.
set -euo pipefail
PY=${PY:-python}
R=${RESULTS:-studies/peers-quick}
JOBS=${JOBS:-1}
S="$PY -m eqbench sweep --profile quick --no-artifacts --no-plot --time-limit 3600 --results $R --jobs $JOBS"
# The LJ-13 cells of the two expensive peers take 60-80 min each on one free core (the time limit is
# not part of a cell's identity, so a longer one resumes the same cells).
L="$PY -m eqbench sweep --profile quick --no-artifacts --no-plot --time-limit 7200 --results $R --jobs $JOBS"
# en-flow on LJ-13: 86-105 min alone, more when anything shares its core.
LL="$PY -m eqbench sweep --profile quick --no-artifacts --no-plot --time-limit 14400 --results $R --jobs $JOBS"
# en-flow scores and samples with the exact trace (~0.8 s per LJ-13 configuration on one core): its
# scoring sets are cut the same way on every system, as the quick profile now does by default.
EN=(--set 'n_val={default=500, en-flow=100}' --set 'validate_every={default=50, en-flow=100}'
    --set 'n_test={default=2000, en-flow=500}' --set 'n_train_eval={default=1000, en-flow=100}')
$S --task density-estimation --model g-resflow kernel-flow --system dw4 lj13
$S --task density-estimation --model se3-acf en-flow --system dw4 "${EN[@]}"
# se3-acf on LJ-13: its cells are from a worktree of d145fb3 (K = 20 scoring in passes of 512
# rows, twice as fast as 10946e0's passes on a loaded machine; the numbers do not change). The
# peers' protocol, n = 1,000.
$L --task density-estimation --model se3-acf --system lj13 --set 'n_train=[1000]'
# en-flow on LJ-13 holds 12-17 GB at batch 64: its cells are from a worktree of ffd2d3f with the
# training setting micro_batch=32 (the same gradient as the whole batch, ~6 GB, so it runs beside
# another cell on a 24 GB machine; micro_batch exists from 8e45f01 on).
# They run with --time-limit 14400 (seed 1 once ran out of 7,200 s beside the test suite; the limit
# is not part of a cell's identity, so the rerun kept its id).
$LL --task density-estimation --model en-flow --system lj13 "${EN[@]}" --set micro_batch=32 --set 'n_train=[1000]'
# The sizes 10 and 100 of both on LJ-13: from the resumable worktree of e2a27bd (below), the
# same settings as their n = 1,000 cells.
$LL --task density-estimation --model se3-acf --system lj13 --set 'n_train=[10,100]'
$LL --task density-estimation --model en-flow --system lj13 "${EN[@]}" --set micro_batch=32 --set 'n_train=[10,100]'

$S --task bg-reweighting --model g-resflow se3-acf kernel-flow --system dw4
# The cells below are hours long on a CPU core and come from a worktree of e2a27bd, the first
# commit whose cells save training snapshots (every 600 s, --snapshot-every): a cell stopped by
# its limit or a killed sweep continues its training when the same command runs again, with the
# numbers of an uninterrupted run, so one cell may span several sessions.
#   git worktree add --detach ../eqbench-e2a27bd e2a27bd
# en-flow on DW-4 (~85 min per cell), then the peers on LJ-13 with the regularised KL energy the
# kernel flow needs there; en-flow's scoring sets cut like its density-estimation cells (~6 h
# per cell even so).
$LL --task bg-reweighting --model en-flow --system dw4
$PY -m eqbench sweep --profile quick --no-artifacts --no-plot --time-limit 28800 --results "$R" --jobs "$JOBS" \
  --task bg-reweighting --model se3-acf en-flow --system lj13 --set kl_energy_cut=1000 \
  --set 'n_samples={default=10000, en-flow=1000}' --set 'n_test={default=10000, en-flow=500}' --set micro_batch=32
# The coupling-flow authors' gradient guard (grad_clip = dynamic: clip to 2x the median norm of the
# last 100 steps, skip above 20x; their LJ-13 configurations use it) on the same se3-acf cells, from
# a worktree of 5d98fc2 (the first commit with the setting; snapshots as e2a27bd). The unguarded
# cells' training histories are in histories/ (seed 1: the λ-mix diverges from iteration ~340).
#   git worktree add --detach ../eqbench-5d98fc2 5d98fc2
$PY -m eqbench sweep --profile quick --no-artifacts --no-plot --time-limit 28800 --results "$R" --jobs "$JOBS" \
  --task bg-reweighting --model se3-acf --system lj13 --set kl_energy_cut=1000 --set grad_clip=dynamic \
  --set 'n_samples={default=10000, en-flow=1000}' --set 'n_test={default=10000, en-flow=500}' --set micro_batch=32
# The authors' LJ-13 loss adds a frame penalty (weight 10) to the coupling flow's; its effect on
# the density-estimation NLL (the same protocol as the n = 1,000 cells above, from e2a27bd):
$LL --task density-estimation --model se3-acf --system lj13 --set 'n_train=[1000]' --set 'model_config={frame_penalty=10}'
$S --task bg-reweighting --model g-resflow kernel-flow --system lj13
# The same with the regularised KL energy (the setting exists from 5fb9a2f on; run from a worktree
# of 5fb9a2f, as the cells here were):
$S --task bg-reweighting --model kernel-flow --system lj13 --set kl_energy_cut=1000
# Training and sampling cost against the kernel flow and the E(n) CNF, timed in one cell each:
$S --task timing --model en-flow se3-acf g-resflow --system dw4 lj13
# Training from the energy alone (the coupling-flow paper's DW-4 experiment), from a worktree of d145fb3:
$S --task energy-training --model kernel-flow real-nvp g-resflow se3-acf --system dw4
$S --task energy-training --model kernel-flow real-nvp --system lj13 --set kl_energy_cut=1000
# The coupling flow trained from the LJ-13 energy alone: hours per cell on a CPU core, so from the
# resumable worktree of e2a27bd (above).
$LL --task energy-training --model se3-acf --system lj13 --set kl_energy_cut=1000
# Seed 0 of these diverges (non-finite gradient at iteration 568); the same cells with the authors'
# gradient guard, from the worktree of 5d98fc2 (above):
$LL --task energy-training --model se3-acf --system lj13 --set kl_energy_cut=1000 --set grad_clip=dynamic
# Their training losses, histories/se3-acf-lj13-energy.png (the failed seed 0's history was read from
# its last snapshot: python histories/extract.py OUT.csv 337e872da71ab367 .snapshots/.../fit-0.pt):
#   H=histories C=cells/energy-training
#   python $H/plot_energy.py $H/se3-acf-lj13-energy.png \
#     "seed 0 (failed: non-finite gradient)::$H/se3-acf-lj13-energy-seed0-337e872da71ab367.csv" \
#     "seed 1::$C/8118263f64b0e59f.json" "seed 2::$C/190975ca2dead1e6.json" \
#     "seed 0, guard::$C/bded997bd02f3aa1.json" "seed 1, guard::$C/4b9e988ae846b7d3.json" \
#     "seed 2, guard::$C/579eb8cf81108601.json"
# The coupling flow at its authors' budget (~3,200 iterations of batch 32; quick runs 400 of 64):
$PY -m eqbench sweep --profile quick --no-artifacts --no-plot --time-limit 5400 --jobs "$JOBS" \
  --results "${R%/}-budget" --task density-estimation --model se3-acf --system dw4 \
  --set n_train=[1000] --set iterations=3200 --set batch_size=32 --set validate_every=400
