#!/usr/bin/env bash
# Does training for stains and scanners the model never saw (augmentation preset he-shift: HED stain jitter,
# gamma, blur or sharpening, JPEG, noise) change what nuclei-he does on held-out images? The shipped nuclei-he
# trained STEPS more steps (default 1000; lr 1e-4, cosine decay to 1e-5 from the half way point, the last state)
# on its 23 training images with its own augmentation (run c, the step-matched control) and with he-shift
# (run s), side by side with one thread each; both scored at the defaults on the 7 held-out images, and the
# shipped model with them, seeds 0-2 (runs/stainshift/eval-{shipped,c,s}-SEED.json). Then
# benchmarks/stain_shift.py scores the three on the held-out images shifted as other labs and scanners shift them.
#
#   bash training/nuclei-he/stain_shift.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
M=runs/stainshift
"$PY" training/nuclei-he/continue_recipes.py $M "${STEPS:-1000}" c='{}' s='{"augment": "he-shift"}'
bash training/nuclei-he/continue_and_score.sh $M training/nuclei-he/val.txt "${RUNS:-c s}" "${THREADS:-1}"
"$PY" benchmarks/stain_shift.py --models nuclei-he,$M/c/model.pt,$M/s/model.pt --json $M/shifted.json
