"""Recipes that continue training the shipped nuclei-he: the 2-channel recipe (recipe-2ch.json) from the shipped
weights for STEPS steps, lr 1e-4 with 50 warm-up steps and a cosine decay to 1e-5 from the half way point, no
checkpoint selection (the last state is the result); each run TAG gets OUT/TAG/recipe.json with its own
settings on top. The start is the shipped file, or the model file in the environment variable INIT (the
experiments in the card started from the file that shipped before the third training step:
`git show 81516f0:src/napari_segdiff/weights/nuclei-he.pt > runs/nuclei-he-fabf119.pt`, then
INIT=runs/nuclei-he-fabf119.pt). The continue-training experiments (more_data.sh, interior_masks.sh,
stain_shift.sh) train and score them with continue_and_score.sh.

    python training/nuclei-he/continue_recipes.py OUT STEPS TAG='{"key": value}' [TAG='{...}' ...]
"""

import json
import os
import sys
from pathlib import Path

out, steps = Path(sys.argv[1]), int(sys.argv[2])
for spec in sys.argv[3:]:
    tag, _, settings = spec.partition("=")
    recipe = json.loads(Path("training/nuclei-he/recipe-2ch.json").read_text())
    recipe.pop("net", None)  # the shipped file's network
    run = out / tag
    run.mkdir(parents=True, exist_ok=True)
    recipe.update(
        out=str(run / "train"),
        max_steps=steps,
        lr=1e-4,
        warmup_steps=50,
        lr_decay_start=steps // 2,
        lr_min=1e-5,
        max_minutes=0,
        val_every=10**7,
        init=os.environ.get("INIT", "src/napari_segdiff/weights/nuclei-he.pt"),
    )
    recipe.update(json.loads(settings or "{}"))
    (run / "recipe.json").write_text(json.dumps(recipe, indent=2))
