#!/usr/bin/env bash
# Bring your own flow, end to end (README "Adding a model"): the zuko example, installed as a
# plugin, is trained through `run` with its own learning rate and schedule, scored from its kept
# checkpoint through `evaluate` (no training), and reported beside the kernel flow.
# Usage: walkthrough.sh RESULTS_DIR [PROFILE]   (needs `eqbench` on PATH and the plugin installed)
set -euo pipefail
results=${1:?usage: walkthrough.sh RESULTS_DIR [PROFILE]}
profile=${2:-smoke}
common=(--task density-estimation --system dw4 --profile "$profile" --set 'augment=[false]' --seeds 1
        --results "$results" --no-plot)

eqbench list models | grep -q zuko-nsf
# 1. the plugin, trained with its own settings (cosine schedule, lower lr, short warm-up)
eqbench run --model zuko-nsf "${common[@]}" --set lr=1e-3 --set schedule=cosine --set lr_warmup=2
checkpoint=$(ls "$results"/artifacts/density-estimation/*/model.pt)
# 2. the paper's kernel flow, trained by the paper's protocol, into the same results
eqbench run --model kernel-flow "${common[@]}"
# 3. the plugin's kept checkpoint, scored without training
eqbench evaluate --model zuko-nsf --system dw4 --checkpoint "$checkpoint" --profile "$profile" \
    --results "$results" --no-plot
# 4. one report with both models, and the evaluated flow
eqbench report --results "$results"
grep -q "zuko-nsf" "$results/report.html" && grep -q "kernel-flow" "$results/report.html" \
    && grep -q "Evaluated flows" "$results/report.html"
echo "walkthrough ok: $results/report.html"
