#!/bin/sh
# The quality run of train_charlm: the same model, data and number of steps for softmax,
# polynomial (p = 4), polysketch (r = 32, local_exact) and learned (r = 32, local_exact), first at
# the default context (256) and then at context 2048 (the defaults include RoPE since the ablation
# of docs/design.md §9.8; the committed table predates it), then the plot and table
# (docs/charlm_quality.png, docs/charlm_quality.md) from the CSV logs.
#
#   sh examples/charlm/quality_run.sh [BUILD_DIR [OUT_DIR]]
#
# BUILD_DIR (default build/test) must hold examples/charlm/train_charlm and kjv.txt
# (cmake --preset test && cmake --build build/test -j2 --target charlm_data). It takes about an
# hour of both cores: run it on a quiet machine, every run is timed. STEPS, LONG_STEPS,
# THREADS, DATA (another text) and DOCS (where the plot and table go) override the defaults
# from the environment.
set -eu
cd "$(dirname "$0")/../.."
build=${1:-build/test}
out=${2:-build/charlm_quality}
bin=$build/examples/charlm/train_charlm
data=${DATA:-$build/examples/charlm/kjv.txt}
docs=${DOCS:-docs}
steps=${STEPS:-2000}            # context 256, batch 16: 4096 tokens a step
long_steps=${LONG_STEPS:-600}   # context 2048, batch 2: 4096 tokens a step
threads=${THREADS:-2}
[ -x "$bin" ] && [ -f "$data" ] || { echo "quality_run: build $bin and $data first" >&2; exit 1; }
mkdir -p "$out"
manifest=$out/runs.tsv
printf 'label\tkind\tcontext\tbatch\tsteps\tcsv\tload_before\n' > "$manifest"

run() {  # label context batch steps block -- attention flags
  label=$1 context=$2 batch=$3 n=$4 block=$5
  shift 6
  load=$(cut -d' ' -f1 /proc/loadavg)
  echo "== $label: context $context, batch $batch, $n steps (load average $load)" >&2
  "$bin" --data "$data" "$@" --context "$context" --batch "$batch" --steps "$n" --block "$block" \
    --degree 4 --sketch-size 32 --threads "$threads" --seed 1 --log "$out/$label.csv"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$2" "$context" "$batch" "$n" "$label.csv" "$load" >> "$manifest"
}

for ctx in 256 2048; do
  if [ $ctx = 256 ]; then batch=16 n=$steps block=64; else batch=2 n=$long_steps block=256; fi
  run "ctx${ctx}_softmax" $ctx $batch $n $block -- --attention softmax
  run "ctx${ctx}_polynomial" $ctx $batch $n $block -- --attention polynomial
  run "ctx${ctx}_polysketch" $ctx $batch $n $block -- --attention polysketch --local-exact
  run "ctx${ctx}_learned" $ctx $batch $n $block -- --attention learned --local-exact
done
/usr/bin/python3 examples/charlm/plot_quality.py "$out" "$docs/charlm_quality.png" "$docs/charlm_quality.md"
