#!/usr/bin/env bash
# The quality measurement's searches (benchmarks/quality.md), each followed by the retraining of
# what it found: every search runs on the first 4,000 training images of Fashion-MNIST under
# benchmarks/quality/fashion_mnist.yaml, and `keras-darts compare` retrains its derived cell with
# the protocol's three seeds beside the published and random cells already in the folder.
#
#   benchmarks/quality/searches.sh OUT [METHOD...]
#
# OUT holds the searches (OUT/searches/<name>) and the comparison (OUT/compare). METHOD is one of
# the names below (default: all, in this order). Both steps resume: a finished search is not
# repeated, and compare retrains only the seeds it does not have yet.
set -euo pipefail
out=${1:?usage: searches.sh OUT [METHOD...]}
shift
spec="$(dirname "$0")/fashion_mnist.yaml"
all=(darts_2nd darts_1st pc_darts gdas snas fair_darts drnas sdarts beta_darts darts_minus lambda_darts darts_pt)
if [ $# -gt 0 ]; then methods=("$@"); else methods=("${all[@]}"); fi
no_none='search_space.operations=[max_pool_3x3, avg_pool_3x3, skip_connect, sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5]'

settings() {
    # Every method searches first order (the official default of each, and of DARTS' own code);
    # DARTS also searches second order, the paper's best. Schedules that the official code fixes in
    # epochs of its 50-epoch search (150 for SNAS) are scaled to the 4-epoch one: PC-DARTS' warm-up
    # 15 of 50 -> 1 of 4, beta-DARTS' ramp 100 -> 8, SNAS' anneal 150 of 150 -> 4 of 4. The other
    # schedules follow the search's epochs already. DARTS-PT tunes for 1 epoch between selection steps
    # (5 of 50 cannot be scaled below 1) and measures each masked op on the validation split's
    # first 256 examples, not all 2,000 (268 measurements of 25 s each would take two hours).
    case "$1" in
        darts_2nd) ;;
        darts_1st) echo "search.order=first" ;;
        fair_darts) echo "search.order=first"; echo "search.method=fair_darts"; echo "$no_none" ;;
        pc_darts) echo "search.order=first"; echo "search.method=pc_darts"; echo "search.pc_darts.warmup_epochs=1" ;;
        beta_darts) echo "search.order=first"; echo "search.method=beta_darts"; echo "search.beta_darts.ramp_epochs=8" ;;
        snas) echo "search.order=first"; echo "search.method=snas"; echo "search.snas.anneal_epochs=4" ;;
        darts_pt) echo "search.order=first"; echo "search.method=darts_pt"; echo "search.darts_pt.tune_epochs=1"
                  echo "search.darts_pt.measure_examples=256" ;;
        *) echo "search.order=first"; echo "search.method=$1" ;;
    esac
}

for name in "${methods[@]}"; do
    run="$out/searches/$name"
    if [ ! -f "$run/derived.yaml" ]; then
        sets=(--set data.max_train_examples=4000)
        while IFS= read -r line; do [ -n "$line" ] && sets+=(--set "$line"); done < <(settings "$name")
        echo "== search $name: ${sets[*]}"
        keras-darts search "$spec" --run-dir "$run" "${sets[@]}" --no-progress
    fi
    runs=()
    for done_name in "${all[@]}"; do
        [ -f "$out/searches/$done_name/derived.yaml" ] && runs+=(--run "$out/searches/$done_name")
    done
    echo "== compare with $(( ${#runs[@]} / 2 )) searched cells"
    keras-darts compare "$spec" --derived DARTS_V2 --derived DARTS_V1 --random 8 --random-seed 0 --seeds 3 \
        "${runs[@]}" --out "$out/compare" --no-progress
done
