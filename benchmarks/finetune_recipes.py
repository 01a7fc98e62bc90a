"""Fine-tuning recipes side by side: the same model fine-tuned on the same tiles for the same wall-clock budget
with each recipe, then scored on other tiles of the same place (pooled building IoU, F1, AJI).

    python benchmarks/finetune_recipes.py --model buildings-all --train 063,065,067,069 \
        --test 064,066,068,070 --minutes 10 --recipes '{}' '{"freeze_encoder": true}'

Each recipe is a JSON object of training settings (`TrainConfig` fields) laid over `finetune`'s own recipe;
`{}` is the recipe as shipped. What a budget buys depends on the CPU: the steps each run made are printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from buildings_eval import DATA, evaluate, summary

from napari_segdiff.training.finetune import finetune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="buildings-all")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--train", required=True, help="comma-separated tile names to fine-tune on")
    ap.add_argument("--test", required=True, help="comma-separated tile names to score")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--recipes", nargs="+", default=["{}"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    data, train, test = Path(a.data), a.train.split(","), a.test.split(",")
    tmp = Path(tempfile.mkdtemp())
    out = {"model": a.model, "train": train, "test": test, "minutes": a.minutes, "rows": []}
    try:
        for sub in ("images", "masks"):
            (tmp / "data" / sub).mkdir(parents=True)
            for n in train:
                shutil.copy(data / sub / f"{n}.png", tmp / "data" / sub)
        base = summary(evaluate(a.model, test, data))["all"]
        print(f"base {a.model}: {base}", flush=True)
        out["base"] = base
        for i, text in enumerate(a.recipes):
            recipe = json.loads(text)
            r = finetune(
                a.model,
                tmp / "data",
                tmp / f"ft{i}.pt",
                minutes=a.minutes,
                threads=a.threads,
                recipe=recipe,
                progress=False,
                blend=1,  # the recipes' own fine-tuned weights, unblended
            )
            s = summary(evaluate(str(r.path), test, data))["all"]
            row = {"recipe": recipe, "steps": r.steps, "minutes": round(r.minutes, 2), **s}
            print(json.dumps(row), flush=True)
            out["rows"].append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
