#!/usr/bin/env bash
# The quick-profile cells behind the report's "Standard metrics" tables (README "The field's
# evaluation standard"): density estimation at the peers' n_train = 1,000 (test NLL, KL(p‖q) with
# its error from the cached log Z, energy W1/W2, distance-histogram TV, coordinate W2 plain and
# aligned) for the kernel flow, real NVP and the G-residual flow, three seeds, on dw4, lj13 and
# lj55; on lj55 also bg-reweighting (reverse and forward ESS, the same metrics before and after
# reweighting) of the kernel flow and real NVP, with and without kl_energy_cut. Cells live in studies/standard-metrics/cells/; a cell's id hashes eqbench's source, so
# resume them from a worktree of the commit named in studies/README.md:
#
#   git worktree add ../eqbench-sm <commit>
#   cd ../eqbench-sm && PYTHONPATH=$PWD RESULTS=<repo>/studies/standard-metrics bash <repo>/studies/standard-metrics/run.sh
#
# SYSTEMS picks the systems (default "dw4 lj13"). lj55 needs `eqbench data lj55 --jobs 3` (~1 h
# on 2 cores) and `eqbench log-z lj55` (~20 min) first, and its cells come from another commit
# (studies/README.md). Rerunning skips finished cells. One thread per cell.
set -euo pipefail
PY=${PY:-python}
R=${RESULTS:-studies/standard-metrics}
JOBS=${JOBS:-1}
SYSTEMS=${SYSTEMS:-dw4 lj13}
LJ55_MODELS=${LJ55_MODELS:-real-nvp kernel-flow g-resflow}
S="$PY -m eqbench sweep --profile quick --no-artifacts --no-plot --time-limit 5400 --results $R --jobs $JOBS"
# shellcheck disable=SC2086
PAPER_SYSTEMS=${SYSTEMS/lj55/}
if [[ -n "${PAPER_SYSTEMS// /}" ]]; then
  $S --task density-estimation --model kernel-flow real-nvp g-resflow --system $PAPER_SYSTEMS --set 'n_train=[1000]'
fi
# lj55 (make its data first: `python -m eqbench data lj55 --jobs 3`): its pool holds 1,000 test
# configurations, and one training iteration costs ~10-20x LJ-13's (float32, batch 64, one core:
# kernel flow ~3-4 s, g-resflow ~6-9 s, real NVP ~0.1 s; a g-resflow process holds ~6.5 GB), so
# these cells run half the quick budget
# (200 iterations) and align 100 configurations per set (recorded in every cell's settings).
# se3-acf does not fit: one training batch of 64 LJ-55 configurations needed more than 20 GB
# (float32; its EGNNs keep ~12,000 edge features per configuration for backpropagation).
# en-flow's exact trace (165 backward passes per solver evaluation) is not run on lj55.
LJ55_TASKS=${LJ55_TASKS:-density-estimation bg-reweighting bg-reweighting-cut}
LJ55_BG_MODELS=${LJ55_BG_MODELS:-real-nvp kernel-flow}
if [[ " $SYSTEMS " == *" lj55 "* && " $LJ55_TASKS " == *" density-estimation "* ]]; then
  $S --task density-estimation --model $LJ55_MODELS --system lj55 --set 'n_train=[1000]' --set 'augment=[false]' \
    --set n_test=1000 --set iterations=200 --set coord_w2_aligned_samples=100 ${LJ55_SEEDS:+--seeds $LJ55_SEEDS}
fi
# bg-reweighting on lj55 at the same reduced budget: 200 ML iterations, then 100 of the λ-mix
# (λ 0 -> 0.5), 1,000 flow samples against the 1,000 test configurations. g-resflow is left out:
# ~9 s per training iteration and ~6 min to draw 1,000 samples (fixed-point inverse) on one core.
if [[ " $SYSTEMS " == *" lj55 "* && " $LJ55_TASKS " == *" bg-reweighting "* ]]; then
  $S --task bg-reweighting --model $LJ55_BG_MODELS --system lj55 --set 'augment=[false]' --set n_test=1000 \
    --set n_samples=1000 --set pretrain_iterations=200 --set mix_iterations=100 --set coord_w2_aligned_samples=100 \
    ${LJ55_SEEDS:+--seeds $LJ55_SEEDS}
fi
# The raw energy (the paper's protocol, above) stops LJ-55 runs at their first λ-mix steps: flow
# samples with clashing particles have u ~ 1e17 kT and a gradient beyond float32. The same cells
# with the Boltzmann generators' regularised energy in the KL term (kl_energy_cut, bgflow's 1,000 kT):
if [[ " $SYSTEMS " == *" lj55 "* && " $LJ55_TASKS " == *" bg-reweighting-cut "* ]]; then
  $S --task bg-reweighting --model $LJ55_BG_MODELS --system lj55 --set 'augment=[false]' --set n_test=1000 \
    --set n_samples=1000 --set pretrain_iterations=200 --set mix_iterations=100 --set coord_w2_aligned_samples=100 \
    --set kl_energy_cut=1000 ${LJ55_SEEDS:+--seeds $LJ55_SEEDS}
fi
