#!/usr/bin/env bash
# Does the interior channel learn more from the 13 training images without an instance map, taught where their
# mask can tell (interior_from_masks: the background, and the mask's parts that look like one nucleus)? The
# shipped nuclei-he trained STEPS more steps (default 1600; lr 1e-4, cosine decay to 1e-5 from the half way
# point, the last state) on its 23 training images, without (run c) and with (run m) interior_from_masks, side
# by side with one thread each; both scored at the defaults on the 7 held-out images, and the shipped model with
# them, seeds 0-2. Results: runs/intmasks/eval-{shipped,c,m}-SEED.json. RUNS="m" THREADS=2 trains run m alone
# on two threads (the 1,200-step control of more_data.sh moved nothing beyond the seeds' spread).
#
#   bash training/nuclei-he/interior_masks.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
M=runs/intmasks
STEPS=${STEPS:-1600}
RUNS=${RUNS:-c m}
THREADS=${THREADS:-1}
"$PY" training/nuclei-he/continue_recipes.py "$M" "$STEPS" c='{}' m='{"interior_from_masks": true}'
bash training/nuclei-he/continue_and_score.sh "$M" training/nuclei-he/val.txt "$RUNS" "$THREADS"
