#!/usr/bin/env bash
# Leave one place out: train buildings-all's recipe on the other places' tiles, score every tile of the place.
#
#   bash training/buildings-all/lopo.sh PLACE STEPS        e.g.  bash training/buildings-all/lopo.sh Kampala 1500
#   INIT=none bash training/buildings-all/lopo.sh Zanzibar 3000     (the same network, random weights)
#   AUGMENT="aerial-shift,jpeg=0" TAG=nojpeg bash training/buildings-all/lopo.sh Kampala 1200   (an ablation)
#   COLOUR_NORM=1 TAG=cnorm bash training/buildings-all/lopo.sh Kampala 1200   (train and segment on images
#       moved to the training images' mean Lab statistics: TrainConfig.colour_norm)
#   SCALE=0.25 TAG=s025 bash training/buildings-all/lopo.sh Kampala 1200   (the network sees the tiles resized by
#       0.25 instead of the recipe's 0.5: the input-scale ablation)
#   PRESET=cpu-medium TAG=medium bash training/buildings-all/lopo.sh Kampala 1200   (random weights of another
#       network preset at the recipe's image size and input scale: the width ablation; PRESET=cpu-small is the
#       recipe's own network from random weights, as INIT=none)
#   COLOUR_MATCH=0 TAG=raw bash training/buildings-all/lopo.sh Kampala 1200   (no colour matching at segment time;
#       by default the model file records its training tiles' colours and the share 0.5, as buildings-all does)
#
# Checkpoint selection uses the in-place validation tiles (val.txt) of the other places, never the held-out
# place. The recipe starts from buildings-aerial, which was trained on Zanzibar and Nairobi crops, so only
# Kampala and the Philippines are honest held-out places with this start; INIT=none starts from random weights
# of the same network, blind to every place (see the model card).
set -euo pipefail
cd "$(dirname "$0")/../.."
PLACE=$1
STEPS=${2:-1500}
DATA=../shared/data/oam_buildings_all/train
INIT=${INIT:-}
AUGMENT=${AUGMENT:-}
TAG=${TAG:-${INIT}}
RUN=runs/lopo-${PLACE,,}${TAG:+-$TAG}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$RUN/data/images" "$RUN/data/masks"
"$PY" - "$PLACE" "$DATA" "$RUN" "$INIT" "$AUGMENT" "${COLOUR_NORM:-}" "${SCALE:-}" "${PRESET:-}" <<'PYEOF'
import csv, json, os, sys
from pathlib import Path
place, data, run = sys.argv[1], Path(sys.argv[2]).resolve(), Path(sys.argv[3])
rows = list(csv.DictReader(open(data / "tiles.csv")))
keep = [r["file"] for r in rows if r["place"] != place]
assert len(keep) < len(rows), f"no tiles of place {place!r}"
for sub in ("images", "masks"):
    for f in keep:
        link = run / "data" / sub / f
        if not link.exists():
            os.symlink(data / sub / f, link)
val = [n.strip() for n in open("training/buildings-all/val.txt") if n.strip() and not n.startswith("#")]
val = [n for n in val if f"{n}.png" in keep]
(run / "val.txt").write_text("\n".join(val) + "\n")
recipe = json.load(open("training/buildings-all/recipe.json"))
recipe.update(data=str(run / "data"), val=str(run / "val.txt"), out=str(run / "train"))
if sys.argv[8] or sys.argv[4] == "none":  # random weights: the warm start's network, or another preset at its
    import dataclasses                    # image size and input scale
    from napari_segdiff.config import get_preset
    from napari_segdiff.models import load_model
    start = load_model(recipe.pop("init")).config
    net = get_preset(sys.argv[8], image_size=start.image_size, input_scale=start.input_scale) if sys.argv[8] else start
    recipe["net"] = dataclasses.asdict(net)
elif sys.argv[4]:
    recipe["init"] = sys.argv[4]
if sys.argv[5]:
    recipe["augment"] = sys.argv[5]
if sys.argv[6] not in ("", "0"):
    recipe["colour_norm"] = True
if sys.argv[7]:
    recipe.setdefault("net", {})["input_scale"] = float(sys.argv[7])
(run / "recipe.json").write_text(json.dumps(recipe, indent=2))
print(f"{place}: {len(keep)} tiles of the other places ({len(val)} of them validation)")
PYEOF
"$PY" -m napari_segdiff.training.cli train --config "$RUN/recipe.json" --amp "${AMP:-auto}" --threads 2 --max-steps "$STEPS" \
    --lr-decay-start $((STEPS * 2 / 3)) --lr-min 1e-5 --val-every $((STEPS / 3)) > "$RUN/train.log" 2>&1
MATCH=()
if [[ -z "${COLOUR_NORM:-}" || "${COLOUR_NORM}" == 0 ]] && [[ "${COLOUR_MATCH:-0.5}" != 0 ]]; then
    MATCH=(--colour-match "${COLOUR_MATCH:-0.5}")
fi
"$PY" -m napari_segdiff.training.cli export "$RUN/train" --name "lopo-${PLACE,,}" -o "$RUN/model.pt" \
    --samples 3 --steps 1 --threshold 0.2 --pixel-size 0.1485 --pixel-unit m --instances hmaxima,h=6,min_area=90 \
    "${MATCH[@]}" --overwrite
"$PY" benchmarks/buildings_eval.py --model "$RUN/model.pt" --place "$PLACE" --json "$RUN/eval.json"
