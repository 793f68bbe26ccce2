#!/usr/bin/env bash
# The quality measurement's recurrent part (benchmarks/quality.md): three searches under
# benchmarks/quality/ptb.yaml on the first 40,000 Penn Treebank training tokens and 20,000
# validation tokens (second- and first-order DARTS and beta-DARTS, the methods defined for
# recurrent cells), then `keras-darts compare` retrains each derived cell, the two published DARTS
# recurrent cells and 8 random cells of the space with three seeds each. Needs
# pip install 'keras-darts[ptb]'.
#
#   benchmarks/quality/ptb.sh OUT
#
# OUT holds the searches (OUT/searches/<name>) and the comparison (OUT/compare). Both steps
# resume: a finished search is not repeated, and compare retrains only the seeds it does not have.
set -euo pipefail
out=${1:?usage: ptb.sh OUT}
spec="$(dirname "$0")/ptb.yaml"
runs=()
for name in darts_2nd darts_1st beta_darts; do
    run="$out/searches/$name"
    sets=(--set data.max_train_tokens=40000 --set data.max_eval_tokens=20000)
    case "$name" in
        darts_1st) sets+=(--set search.order=first) ;;
        # beta-DARTS' official 100-epoch ramp, scaled as the convolutional part scales it (2 x epochs).
        beta_darts) sets+=(--set search.order=first --set search.method=beta_darts
                           --set search.beta_darts.ramp_epochs=6) ;;
    esac
    if [ ! -f "$run/derived.yaml" ]; then
        echo "== search $name: ${sets[*]}"
        keras-darts search "$spec" --run-dir "$run" "${sets[@]}" --no-progress
    fi
    runs+=(--run "$run")
done
echo "== compare"
keras-darts compare "$spec" --derived DARTS_V2_RNN --derived DARTS_V1_RNN --random 8 --random-seed 0 --seeds 3 \
    "${runs[@]}" --out "$out/compare" --no-progress
