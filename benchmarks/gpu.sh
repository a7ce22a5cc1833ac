#!/usr/bin/env bash
# Every GPU measurement in one run (under 9 minutes on one H100), tables printed last.
#
#   benchmarks/gpu.sh DATA [RESULTS_DIR [STAGE...]]
#
# DATA is a CIFAR-10 source (e.g. cifar10-jpeg.tar.gz); RESULTS_DIR (default: $OUT if set,
# else /tmp/cifar-inception-gpu) receives the JSON files, the logs and the decoded-array cache.
# The machine needs PyTorch, NumPy, Pillow and tqdm, nothing of this project: the project is
# installed from this working tree (pip, editable, no dependencies, no network), or put on
# PYTHONPATH when that fails or INSTALL=0.
#
# Stages, most important first, each cut short if the time budget (BUDGET_S, 510 s) runs out
# (default: fast baseline throughput ablation):
#   fast       the fast recipe for SEEDS seeds (default 5): time to 92/93/94%, accuracy at
#              2/3/5/10 s;
#   baseline   the plain baseline (baseline-plain, airbench94's network) by the same recipe;
#   throughput images/s, training and inference, of every registered model;
#   ablation   the fast recipe with one trick switched off at a time, ABLATION_SEEDS seeds
#              each (default 2);
#   report     the report's four networks with its recipe for its epochs
#              (reproduce_report.py: seed-inception-v2 for 25 epochs, both GoogLeNets and the
#              naive module for 10), resuming what an earlier call left in RESULTS_DIR/report;
#   report-default  the same networks with the project's default recipe, for the same epochs.
# The report stages take longer than one budget (seed-inception-v2 alone is about 35,000
# steps of 32): run them alone (`gpu.sh DATA RESULTS report`), and again with the same
# RESULTS_DIR to continue.
# Without CUDA it falls back to a tiny CPU setting (one seed, one short epoch, a subset of the
# images) that only shows the whole script works.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
data="${1:?usage: benchmarks/gpu.sh DATA [RESULTS_DIR [STAGE...]]}"
results="${2:-${OUT:-/tmp/cifar-inception-gpu}}"
shift $(( $# < 2 ? $# : 2 ))
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(fast baseline throughput ablation)
for stage in "${stages[@]}"; do
    case "$stage" in
        fast|baseline|throughput|ablation|report|report-default) ;;
        *) echo "gpu.sh: error: unknown stage $stage" >&2; exit 2 ;;
    esac
done
wanted() { [[ " ${stages[*]} " == *" $1 "* ]]; }
python="${PYTHON:-python3}"
budget="${BUDGET_S:-510}"
started=$(date +%s)

[ -e "$data" ] || { echo "gpu.sh: error: no data at $data" >&2; exit 2; }
data="$(cd "$(dirname "$data")" && pwd)/$(basename "$data")"
mkdir -p "$results"
results="$(cd "$results" && pwd)"
export PYTHONUNBUFFERED=1
export CIFAR_INCEPTION_CACHE="$results/cache"   # no user cache folder needed
cd "$repo"

# -- install from the working tree
if [ "${INSTALL:-1}" = 1 ] && "$python" -m pip install -q --no-deps --no-build-isolation \
        -e . >"$results/install.log" 2>&1; then
    echo "installed the project from $repo"
else
    echo "using PYTHONPATH=$repo/src (see $results/install.log when pip was tried)"
    export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$python" - <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "numpy", "PIL", "tqdm") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh: error: missing Python packages: {', '.join(missing)}")
import cifar_inception.training  # noqa: F401  (the project imports)
EOF
then
    exit 2
fi

if "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    mode=cuda
    seeds="${SEEDS:-5}"
    ablation_seeds="${ABLATION_SEEDS:-2}"
    tiny=()
    throughput=(--batch-size 1024 --steps 20 --warmup 5 --peak)
    report=(--models seed-inception-v2 seed-googlenet seed-googlenet:fix_3x3=true seed-naive)
else
    mode=cpu-tiny
    seeds=1
    ablation_seeds=1
    echo "no CUDA device: running a tiny CPU setting that only checks the script works"
    tiny=(--device cpu --test-limit 200 --set epochs=1 --set train_limit=512
          --set val_size=50 --set batch_size=64 --set num_threads=1
          --set model_options={\"width\":0.25})
    throughput=(--device cpu --batch-size 16 --steps 1 --warmup 1
                --threads 1 --models inception-cpu inception-fast:width=0.25 googlenet:width=0.25)
    report=(--models seed-googlenet --epochs 1 --device cpu --threads 1
            --set train_limit=64 --set val_size=20)
fi
echo "mode: $mode; results in $results; budget ${budget}s"

remaining() { echo $(( budget - ($(date +%s) - started) )); }

step() {  # step NAME COMMAND...: run with the time left, log to NAME.log
    local name="$1"; shift
    local left; left=$(remaining)
    if [ "$left" -le 10 ]; then
        echo "skipped $name: the time budget is spent" | tee "$results/$name.log"
        return
    fi
    echo "== $name (at most ${left}s)"
    timeout --signal=INT --kill-after=15 "$left" "$@" 2>&1 | tee "$results/$name.log"
    local status=${PIPESTATUS[0]}
    [ "$status" = 0 ] || echo "$name: exit status $status" | tee -a "$results/$name.log"
}

tta="$here/time_to_accuracy.py"
wanted fast && step fast "$python" "$tta" --recipe fast --seeds "$seeds" --data-dir "$data" \
    --quiet --out-dir "$results/runs" --json "$results/fast.json" "${tiny[@]}"
wanted baseline && step baseline "$python" "$tta" --recipe fast --model baseline-plain \
    --seeds "$seeds" --data-dir "$data" --quiet --out-dir "$results/runs" \
    --json "$results/baseline.json" "${tiny[@]}"
wanted throughput && step throughput "$python" "$here/throughput.py" "${throughput[@]}" \
    --json "$results/throughput.json"
wanted ablation && step ablation "$python" "$tta" --recipe fast --seeds "$ablation_seeds" \
    --data-dir "$data" --quiet --out-dir "$results/runs" --json "$results/ablation.json" \
    "${tiny[@]}" \
    --ablate no-lookahead:lookahead=false no-whiten:whiten_init=false \
             no-tta:tta=false random-flips:flip_mode=random no-label-smoothing:label_smoothing=0 \
             no-bias-lr:norm_bias_lr=1 bn-scale:model_options={\"bn_scale\":true} \
             no-dirac:model_options={\"dirac\":false} fp32:amp=false
wanted report && step report "$python" "$here/reproduce_report.py" "${report[@]}" \
    --data-dir "$data" --out-dir "$results/report" --json "$results/report.json" \
    --plot "$results/report-curves.png"
wanted report-default && step report-default "$python" "$here/reproduce_report.py" \
    "${report[@]}" --recipe default --data-dir "$data" --out-dir "$results/report-default" \
    --json "$results/report-default.json"

# -- the tables, last
echo
echo "================ results ($mode, $(( $(date +%s) - started ))s in all) ================"
for name in "${stages[@]}"; do
    log="$results/$name.log"
    [ -f "$log" ] || continue
    # each table starts at a blank line followed by a title line; print from the first one
    awk 'BEGIN{p=0} /^(Time to accuracy|Throughput|Machine rate|Ablation|The report)/{p=1} p' \
        "$log"
    echo
done
