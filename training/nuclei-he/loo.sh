#!/usr/bin/env bash
# Leave one organ out: nuclei-he's recipe on the other organs' training images for MINUTES of wall time;
# with --with, also on the organ's images but its last two (the ones benchmarks/adaptation.py scores), as
# the "trained with the organ" reference of the adaptation curve.
#
#   bash training/nuclei-he/loo.sh ORGAN MINUTES [--with]     e.g.  bash training/nuclei-he/loo.sh breast 15
#
# Validation (checkpoint choice) uses nuclei-he's held-out images of the other organs, never the organ's.
# THREADS (default 2) sets the torch threads, e.g. THREADS=1 to train the run and its --with reference side by
# side on a 2-core machine. STEPS ends the run after that many optimiser steps instead (MINUTES then caps it),
# so a run and its reference see the same number of steps whatever else shares the cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
ORGAN=${1,,}
MINUTES=$2
THREADS=${THREADS:-2}
WITH=${3:-}
DATA=../shared/data/monuseg/train
RUN=runs/loo-${ORGAN}${WITH:+-with}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$RUN/data/images" "$RUN/data/masks" "$RUN/data/instances"
"$PY" - "$ORGAN" "$DATA" "$RUN" "$WITH" "$THREADS" <<'PYEOF'
import csv, json, os, sys
from pathlib import Path
organ, data, run, with_ = sys.argv[1], Path(sys.argv[2]).resolve(), Path(sys.argv[3]), sys.argv[4]
rows = [r for r in csv.DictReader(open(data.parent / "manifest.csv")) if r["split"] == "train"]
mine = sorted(r["id"] for r in rows if r["organ"].lower() == organ)
assert mine, f"no training images of organ {organ!r}"
keep = [r["id"] for r in rows if r["organ"].lower() != organ] + (mine[:-2] if with_ else [])
for sub in ("images", "masks", "instances"):
    for n in keep:
        src, link = data / sub / f"{n}.png", run / "data" / sub / f"{n}.png"
        if src.exists() and not link.exists():
            os.symlink(src, link)
val = [n.strip() for n in open("training/nuclei-he/val.txt") if n.strip() and not n.startswith("#")]
val = [n for n in val if n in keep]
(run / "val.txt").write_text("\n".join(val) + "\n")
recipe = json.load(open("training/nuclei-he/recipe.json"))
recipe.update(data=str(run / "data"), val=str(run / "val.txt"), out=str(run / "train"), threads=int(sys.argv[5]))
(run / "recipe.json").write_text(json.dumps(recipe, indent=2))
print(f"{organ}: {len(keep)} images ({len(val)} of them validation)" + (f", with {mine[:-2]}" if with_ else ""))
PYEOF
"$PY" -m napari_segdiff.training.cli train --config "$RUN/recipe.json" --amp "${AMP:-auto}" --threads "$THREADS" \
    --max-minutes "$MINUTES" ${STEPS:+--max-steps "$STEPS"} > "$RUN/train.log" 2>&1
"$PY" -m napari_segdiff.training.cli export "$RUN/train" --name "loo-${ORGAN}${WITH:+-with}" -o "$RUN/model.pt" \
    --samples 3 --steps 2 --overlap 0 --pixel-size 0.488 --pixel-unit um --instances hmaxima,h=0.5,min_area=10 --overwrite
