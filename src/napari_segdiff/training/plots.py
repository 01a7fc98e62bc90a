"""Training curves from log.csv as a PNG (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..io import atomic_write_bytes


def plot_log(log_csv: str | Path, out_png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    val = [(int(r["step"]), float(r["val_dice"]), float(r["val_iou"])) for r in rows if r.get("val_dice")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(steps, loss, lw=0.5, alpha=0.4, label="loss")
    k = 50
    if len(loss) > k:
        sm = [sum(loss[i - k : i]) / k for i in range(k, len(loss) + 1)]
        a.plot(steps[k - 1 :], sm, label=f"loss (mean of {k})")
    a.set_yscale("log")
    a.set_xlabel("step")
    a.legend()
    if val:
        s, d, i = zip(*val)
        b.plot(s, d, "o-", label="val Dice")
        b.plot(s, i, "s-", label="val IoU")
        b.set_ylim(0, 1)
        b.legend()
    b.set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(out_png, lambda f: f.write(buf.getvalue()))
