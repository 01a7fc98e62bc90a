#!/usr/bin/env bash
# Does training on more images help on images the model never saw? The shipped nuclei-he trained STEPS more
# steps (default 1200; lr 1e-4, cosine decay to 1e-5 from the half way point, the last state) on its own 23
# training images (run c) and on those plus 4 of its 7 validation images (run x: bladder, colon, prostate,
# stomach), side by side with one thread each; both scored at the defaults on the other 3 (breast, kidney, liver),
# and the shipped model with them, seeds 0-2. Results: runs/moredata/eval-{shipped,c,x}-SEED.json.
#
#   bash training/nuclei-he/more_data.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
M=runs/moredata
STEPS=${STEPS:-1200}
"$PY" - "$M" "$STEPS" <<'PYEOF'
import os, sys
from pathlib import Path
out, steps = Path(sys.argv[1]), int(sys.argv[2])
data = Path("../shared/data/monuseg/train").resolve()
val = [n.strip() for n in open("training/nuclei-he/val.txt") if n.strip() and not n.startswith("#")]
A = ["TCGA-G2-A2EK-01A-02-TSB", "TCGA-NH-A8F7-01A-01-TS1", "TCGA-G9-6363-01Z-00-DX1", "TCGA-RD-A8N9-01A-01-TS1"]
train23 = [p.stem for p in sorted((data / "images").glob("*.png")) if p.stem not in val]
(out).mkdir(parents=True, exist_ok=True)
(out / "B.txt").write_text("\n".join(n for n in val if n not in A) + "\n")
for tag, keep in {"c": train23, "x": train23 + A}.items():
    run = out / tag
    for sub in ("images", "masks", "instances"):
        (run / "data" / sub).mkdir(parents=True, exist_ok=True)
        for n in keep:
            src, link = data / sub / f"{n}.png", run / "data" / sub / f"{n}.png"
            if src.exists() and not link.exists():
                os.symlink(src, link)
PYEOF
"$PY" training/nuclei-he/continue_recipes.py "$M" "$STEPS" c="{\"data\": \"$M/c/data\", \"val\": \"none\"}" \
    x="{\"data\": \"$M/x/data\", \"val\": \"none\"}"
bash training/nuclei-he/continue_and_score.sh "$M" "$M/B.txt" "c x" 1
