"""Make docs/screenshot.png: the napari window with the SegDiff widget and its results on a shipped sample.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/make_screenshot.py            # H&E nuclei
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/make_screenshot.py --sample buildings_scene \
        --model buildings-all --instances -o docs/screenshot-buildings.jpg                # every building

Run under a display (headless: ``xvfb-run -a .venv/bin/python scripts/make_screenshot.py``, with
QT_QPA_PLATFORM unset). Uses the shipped 'nuclei-he' model when installed, otherwise the untrained 'tiny'
network with a warning (its outputs are meaningless: regenerate once the real model ships).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default=str(ROOT / "docs" / "screenshot.png"))
    p.add_argument("--model", default="nuclei-he", help="shipped model to use when installed")
    p.add_argument("--sample", default="nuclei_he", help="napari-segdiff sample key (nuclei_he, buildings_scene, ...)")
    p.add_argument("--instances", action="store_true", help="also label the objects (a Labels layer, the count)")
    p.add_argument("--samples", type=int, help="default: the model's recommended value")
    p.add_argument("--steps", type=int, help="default: the model's recommended value")
    p.add_argument("--tile", type=int, help="default: the library's TilingConfig.tile")
    p.add_argument("--size", default="1400x900", help="window size WxH")
    p.add_argument("--threads", type=int, help="torch intra-op threads (e.g. 1 on a busy machine)")
    args = p.parse_args(argv)

    import napari
    import torch
    from qtpy.QtCore import QEventLoop

    from napari_segdiff import SegDiffModel, list_models

    if args.threads:
        torch.set_num_threads(args.threads)
    viewer = napari.Viewer(title="napari-segdiff")
    w, h = (int(v) for v in args.size.split("x"))
    viewer.window._qt_window.resize(w, h)
    app = napari.qt.get_qapp()
    _, widget = viewer.window.add_plugin_dock_widget("napari-segdiff", "SegDiff segmentation")
    app.processEvents()  # dock first: the canvas takes its final size before the image is fitted to it
    viewer.open_sample("napari-segdiff", args.sample)
    image = next(layer for layer in viewer.layers if "ground truth" not in layer.name)
    for layer in viewer.layers:
        if "ground truth" in layer.name:
            layer.visible = False
    widget.image.value = image
    if args.model in list_models():
        widget.model.value = args.model
    else:
        print(
            f"WARNING: shipped model {args.model!r} is not installed (installed: {sorted(list_models()) or 'none'}); "
            "using the UNTRAINED 'tiny' network: the screenshot shows the interface, not real results. "
            "Regenerate it once the model ships.",
            file=sys.stderr,
        )
        widget.set_model(SegDiffModel.from_config("tiny"))
        widget.samples.value, widget.steps.value, widget.tile.value = 2, 2, 64
    for name in ("samples", "steps", "tile"):
        if getattr(args, name) is not None:
            getattr(widget, name).value = getattr(args, name)
    widget.seed.value = 0
    widget.instances.value = bool(args.instances)

    loop = QEventLoop()
    widget.run_finished.connect(lambda status: loop.quit())
    widget.run()
    if widget.running:
        loop.exec()
    print(widget.status.value)
    if not widget.status.value.startswith("done"):
        return 1
    shown = f"{image.name} labels" if args.instances else f"{image.name} mask"
    if args.instances:
        viewer.layers[f"{image.name} mask"].visible = False
    viewer.layers.selection.active = viewer.layers[shown]
    app.processEvents()
    viewer.reset_view()  # fit the image to the canvas at its final size
    for _ in range(5):  # let the canvas and docks paint
        app.processEvents()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.window._qt_window.grab().save(str(out))
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
