#!/bin/sh
# The 500-step ablation of docs/design.md §9.8: one change at a time against the model of §9.1
# (without RoPE, which the ablation made the default),
# each row over seeds 1, 2 and 3, every run on one thread (the same bits for a given seed), JOBS
# runs side by side; then the table (docs/charlm_ablation.md) from the CSV logs.
#
#   sh examples/charlm/ablation.sh [BUILD_DIR [OUT_DIR]]
#
# BUILD_DIR (default build/test) must hold examples/charlm/train_charlm and kjv.txt. A run whose
# log already reaches the last step is skipped, so an interrupted ablation continues. About 3–8
# minutes a run on the 2-core VM (one thread each, two at a time); ROWS selects rows by label
# (a grep pattern), JOBS (2), SEEDS ("1 2 3"), STEPS (500) and DOCS (docs) override the defaults.
set -eu
cd "$(dirname "$0")/../.."
build=${1:-build/test}
out=${2:-build/charlm_ablation}
bin=$build/examples/charlm/train_charlm
data=${DATA:-$build/examples/charlm/kjv.txt}
jobs=${JOBS:-2} seeds=${SEEDS:-1 2 3} steps=${STEPS:-500} docs=${DOCS:-docs}
[ -x "$bin" ] && [ -f "$data" ] || { echo "ablation: build $bin and $data first" >&2; exit 1; }
mkdir -p "$out"

# label: flags (the exact kinds also log their attention rows, --attn-log)
rows() {
  cat <<'ROWS'
soft: --attention softmax --no-rope
poly: --attention polynomial --no-rope
soft_rope: --attention softmax --rope
poly_rope: --attention polynomial --rope
ps_rope: --attention polysketch --local-exact --rope
learned_rope: --attention learned --local-exact --rope
poly_lr2e-3: --attention polynomial --no-rope --lr 2e-3
poly_gain: --attention polynomial --no-rope --head-gain
poly_p8: --attention polynomial --no-rope --degree 8
poly_nb0: --attention polynomial --no-rope --normalizer-bias 0
poly_qklr3: --attention polynomial --no-rope --qk-lr 3
poly_b2: --attention polynomial --no-rope --beta2 0.99
ROWS
}

rows | grep -E "^(${ROWS:-.*}):" | while IFS=: read -r label flags; do
  for seed in $seeds; do
    name=${label}_s$seed
    if [ -f "$out/$name.csv" ] && grep -q "^$steps," "$out/$name.csv"; then continue; fi
    attn=""
    case "$flags" in *polysketch*|*learned*) ;; *) attn="--attn-log $out/$name.attn.csv" ;; esac
    echo "$bin --data $data --steps $steps --threads 1 --seed $seed --log $out/$name.csv $attn $flags"
  done
done | xargs -P "$jobs" -I{} sh -c '{} > /dev/null 2>&1 || echo "ablation: failed: {}" >&2'
/usr/bin/python3 examples/charlm/ablation_table.py "$out" "$docs/charlm_ablation.md"
