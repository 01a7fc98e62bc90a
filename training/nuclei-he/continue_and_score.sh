#!/usr/bin/env bash
# The second half of the continue-training experiments (more_data.sh, interior_masks.sh): each run T of RUNS
# trains from M/T/recipe.json, side by side, THREADS threads each; its last state is exported at the nuclei-he
# defaults to M/T/model.pt; then the shipped model and each export are scored on the images named in NAMES,
# seeds 0-2 (M/eval-{shipped,T}-SEED.json).
#
#   bash training/nuclei-he/continue_and_score.sh M NAMES "RUNS" THREADS
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
M=$1 NAMES=$2 RUNS=$3 THREADS=$4
EXP="--samples 3 --steps 1 --threshold 0.4 --overlap 0 --pixel-size 0.488 --pixel-unit um --overwrite
     --instances interior_peaks,h=0.15,seed_threshold=0.3,min_area=20"
for t in $RUNS; do
  "$PY" -m napari_segdiff.training.cli train --config $M/$t/recipe.json --amp auto --threads $THREADS > $M/$t/train.log 2>&1 &
done
wait
for t in $RUNS; do
  "$PY" -m napari_segdiff.training.cli export $M/$t/train --checkpoint last.pt --name nuclei-he-$t -o $M/$t/model.pt $EXP
done
for s in 0 1 2; do
  for t in shipped $RUNS; do
    m=$M/$t/model.pt; [ $t = shipped ] && m=nuclei-he
    "$PY" -m napari_segdiff.training.cli eval --model $m --data ../shared/data/monuseg/train --names $NAMES \
        --seed $s --json $M/eval-$t-$s.json | grep "^mean"
  done
done
