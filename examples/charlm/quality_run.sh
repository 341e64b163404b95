#!/bin/sh
# The quality run of train_charlm (docs/design.md §9.7, §9.8): the same model, data and steps for
# softmax, polynomial (p = 4), polysketch (r = 32, local_exact) and learned (r = 32,
# local_exact), at context 256 (batch 16, 2000 steps) and context 1024 (batch 4, 700 steps), two
# seeds each; then the plot and table (docs/charlm_quality.png, docs/charlm_quality.md).
# CONTEXTS=4096 (or 2048) is the long-context run (docs/design.md §9.10): batch 1 (2), 1000 steps,
# no learned kind (its step is 2.7x softmax's), and PolySketch trains 1.6x the steps (STRETCH,
# in tenths: 16), about softmax's wall-clock, since the question there is the time to quality.
#
#   sh examples/charlm/quality_run.sh [BUILD_DIR [OUT_DIR]]
#
# Two passes:
# 1. The curves. Every run trains on one thread (the same bits for a given seed on any thread
#    count), JOBS runs side by side, longest first. Bits/char do not depend on the machine's
#    load, so this pass may share the machine. A run whose log reaches its last step is skipped,
#    so an interrupted pass continues.
# 2. The clock. One short run per kind and context with THREADS threads (2), one at a time:
#    ms/step is the training time from step TIMING_FROM to TIMING_STEPS over the steps between.
#    The wall-clock axis and the time-to-quality table are steps x this ms/step, so this pass
#    needs a quiet machine (the load average before each timing run is recorded).
#
# BUILD_DIR (default build/test) must hold examples/charlm/train_charlm and kjv.txt
# (cmake --preset test && cmake --build build/test -j2 --target train_charlm charlm_data). About 3
# hours of both cores for pass 1 on a 2-core Xeon VM, 5 minutes for pass 2. STEPS, LONG_STEPS, SEEDS ("1 2"),
# JOBS (2), THREADS, CONTEXTS ("256 1024": the plot and table show the contexts listed), XL_STEPS
# (1000, contexts 2048 and 4096), STRETCH, PASSES ("curves clock": either alone runs only that
# pass), DATA (another text), DOCS (where the plot and table go) and NAME (their file name,
# charlm_quality) override the defaults from the environment.
set -eu
cd "$(dirname "$0")/../.."
build=${1:-build/test}
out=${2:-build/charlm_quality}
bin=$build/examples/charlm/train_charlm
data=${DATA:-$build/examples/charlm/kjv.txt}
docs=${DOCS:-docs}
steps=${STEPS:-2000}            # context 256, batch 16: 4096 tokens a step
long_steps=${LONG_STEPS:-700}   # context 1024, batch 4: 4096 tokens a step
xl_steps=${XL_STEPS:-1000}      # contexts 2048 and 4096, batch 2 and 1
stretch=${STRETCH:-16}          # PolySketch's steps at 2048 and 4096, in tenths of xl_steps
name=${NAME:-charlm_quality}
seeds=${SEEDS:-1 2} jobs=${JOBS:-2} threads=${THREADS:-2}
timing_from=20 timing_steps=60
[ -x "$bin" ] && [ -f "$data" ] || { echo "quality_run: build $bin and $data first" >&2; exit 1; }
mkdir -p "$out"

# kind: flags (context 256 longest run first; at context 1024 learned, the slowest and the one
# no long-context target is about, comes last; at 2048 and 4096 it is left out)
kinds() {
  if [ "$1" = 256 ]; then echo "learned: --attention learned --local-exact"; fi
  cat <<'KINDS'
polysketch: --attention polysketch --local-exact
polynomial: --attention polynomial
softmax: --attention softmax
KINDS
  if [ "$1" = 1024 ]; then echo "learned: --attention learned --local-exact"; fi
}
# context batch steps block, for the contexts in CONTEXTS
contexts() {
  for c in ${CONTEXTS:-256 1024}; do
    case $c in
      256) printf '256 16 %s 64\n' "$steps" ;;
      1024) printf '1024 4 %s 256\n' "$long_steps" ;;
      2048) printf '2048 2 %s 256\n' "$xl_steps" ;;
      4096) printf '4096 1 %s 256\n' "$xl_steps" ;;
      *) echo "quality_run: CONTEXTS holds 256, 1024, 2048 and/or 4096, not $c" >&2; exit 1 ;;
    esac
  done
}

passes=${PASSES:-curves clock}
wants() { case " $passes " in *" $1 "*) return 0 ;; esac; return 1; }

# label kind context batch steps block seed flags: every run of the contexts and seeds chosen
runs() {
  contexts | while read -r ctx batch n block; do
    kinds "$ctx" | while IFS=: read -r kind flags; do
      k=$n
      if [ "$kind" = polysketch ] && [ "$ctx" -ge 2048 ]; then k=$((n * stretch / 10)); fi
      for seed in $seeds; do echo "ctx${ctx}_${kind}_s$seed $kind $ctx $batch $k $block $seed $flags"; done
    done
  done
}

manifest=$out/runs.tsv
printf 'label\tkind\tcontext\tbatch\tsteps\tseed\tcsv\n' > "$manifest"
runs | while read -r label kind ctx batch n block seed flags; do
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$kind" "$ctx" "$batch" "$n" "$seed" "$label.csv" >> "$manifest"
done
timing=$out/timing.tsv
[ -f "$timing" ] || printf 'kind\tcontext\tbatch\tthreads\tms_per_step\tload_before\n' > "$timing"

# Pass 1 (PASSES has "curves"): the curves.
if wants curves; then
  runs | while read -r label kind ctx batch n block seed flags; do
    if [ -f "$out/$label.csv" ] && grep -q "^$n," "$out/$label.csv"; then continue; fi
    echo "$bin --data $data --context $ctx --batch $batch --steps $n --block $block --degree 4 --sketch-size 32 --threads 1 --seed $seed --log $out/$label.csv $flags"
  done | xargs -P "$jobs" -I{} sh -c 'echo "== {}" >&2; {} > /dev/null 2>&1 || echo "quality_run: failed: {}" >&2'
fi

# Pass 2 (PASSES has "clock"): the clock, one timed run per kind and context.
if wants clock; then
  contexts | while read -r ctx batch n block; do
    kinds "$ctx" | while IFS=: read -r kind flags; do
      if grep -q "^$kind	$ctx	" "$timing"; then continue; fi
      load=$(cut -d' ' -f1 /proc/loadavg)
      echo "== timing $kind at context $ctx, $threads threads (load average $load)" >&2
      log=$out/timing_ctx${ctx}_$kind.csv
      "$bin" --data "$data" --context "$ctx" --batch "$batch" --steps "$timing_steps" --block "$block" \
        --degree 4 --sketch-size 32 --threads "$threads" --seed 1 --eval-every "$timing_from" --val-chars 4096 \
        --log "$log" $flags > /dev/null
      ms=$(awk -F, -v a="$timing_from" -v b="$timing_steps" \
        '$1 == a { t0 = $4 } $1 == b { t1 = $4 } END { printf "%.1f", 1000 * (t1 - t0) / (b - a) }' "$log")
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$ctx" "$batch" "$threads" "$ms" "$load" >> "$timing"
    done
  done
fi
/usr/bin/python3 examples/charlm/plot_quality.py "$out" "$docs/$name.png" "$docs/$name.md"
