"""napari faces of fine-tuning and review: "SegDiff fine-tuning" and "SegDiff review". Qt/magicgui only here;
the work is :func:`napari_segdiff.training.finetune.finetune` and :mod:`napari_segdiff.review`."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, LineEdit, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from psygnal import Signal

from ._errors import SegDiffError
from .models import list_models, user_models_dir


def viewer_camera(viewer):
    """The viewer's camera: ``viewer.scene.camera`` from napari 0.9 on (where ``viewer.camera`` is
    deprecated), ``viewer.camera`` before."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


class FinetuneWidget(Container):
    """Fine-tune a model on image/Labels layer pairs (e.g. a run's corrected ``mask`` layer).

    Add pairs with **Add pair**, pick the base model, a time budget in minutes and a name, and press **Train**.
    Training runs in a thread worker; the status line shows step, loss and time left. **Cancel** stops it and
    keeps the best state so far (the model file is still written, and the status says so). The new model is
    registered under its name in the user model directory, and every open segmentation widget lists it at
    once. Layers are read, never modified.
    """

    finished = Signal(str)
    model_added = Signal(str)

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.pairs: list[tuple[Any, Any]] = []
        self._worker = None
        self._stop = False
        self.image = ComboBox(
            label="image",
            choices=lambda _w=None: [(ly.name, ly) for ly in self._viewer.layers if isinstance(ly, Image)],
        )
        self.labels = ComboBox(
            label="mask",
            choices=lambda _w=None: [(ly.name, ly) for ly in self._viewer.layers if isinstance(ly, Labels)],
        )
        self.add_pair = PushButton(text="Add pair")
        self.clear_pairs = PushButton(text="Clear pairs")
        self.pair_list = Label(value="no pairs yet")
        self.base = ComboBox(label="base model", choices=lambda _w=None: list(list_models()))
        self.minutes = FloatSpinBox(label="minutes", value=10.0, min=0.1, max=24 * 60, step=1.0)
        from .training.finetune import BLEND_HELP, DEFAULT_BLEND, THRESHOLD_HELP

        self.blend = FloatSpinBox(label="blend", value=DEFAULT_BLEND, min=0.05, max=1.0, step=0.05, tooltip=BLEND_HELP)
        self.base.changed.connect(self._base_changed)
        self.threshold = ComboBox(label="threshold", choices=["keep", "auto"], value="keep", tooltip=THRESHOLD_HELP)
        self.name = LineEdit(label="name", value="my-model")
        self.train_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.extend(
            [
                self.image,
                self.labels,
                self.add_pair,
                self.clear_pairs,
                self.pair_list,
                self.base,
                self.minutes,
                self.blend,
                self.threshold,
                self.name,
                self.train_button,
                self.cancel_button,
                self.status,
            ]
        )
        self.add_pair.changed.connect(self._add_pair)
        self.clear_pairs.changed.connect(self._clear_pairs)
        self.train_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        napari_viewer.layers.events.inserted.connect(lambda e: self.reset_choices())
        napari_viewer.layers.events.removed.connect(lambda e: self.reset_choices())
        self._base_changed()

    def _base_changed(self, *_) -> None:
        """The blend control follows the base model's recommendation (nuclei-he 0.5, else 1); the user may change
        it after picking the model."""
        from .models import shared_model
        from .training.finetune import recommended_blend

        if not self.base.value:
            return
        try:
            meta = shared_model(str(self.base.value)).meta
        except (SegDiffError, OSError):  # a broken model file: the run itself says what is wrong with it
            return
        self.blend.value = recommended_blend(meta)

    def _add_pair(self, *_) -> None:
        img, lab = self.image.value, self.labels.value
        if img is None or lab is None:
            return self._fail("pick an image layer and a Labels layer")
        self.pairs.append((img, lab))
        self.pair_list.value = "; ".join(f"{i.name} + {m.name}" for i, m in self.pairs)

    def _clear_pairs(self, *_) -> None:
        self.pairs = []
        self.pair_list.value = "no pairs yet"

    def samples(self) -> list:
        """The pairs as training samples: RGB uint8 copies of the images, boolean masks (layers untouched) and,
        where a Labels layer holds more than one id, its ids as the objects (what a 2-channel model learns its
        object interiors from)."""
        from .training.datasets import Sample, _rgb_uint8

        out = []
        for k, (img, lab) in enumerate(self.pairs):
            data = np.asarray(img.data[0] if img.multiscale else img.data)
            ids = np.asarray(lab.data)
            mask = ids > 0
            if data.ndim != (3 if img.rgb else 2) or mask.ndim != 2:
                raise SegDiffError(f"{img.name}: fine-tuning takes 2-D images (grey or RGB) and 2-D masks")
            if data.shape[:2] != mask.shape:
                raise SegDiffError(
                    f"{img.name} is {data.shape[:2]} but {lab.name} is {mask.shape}: pair layers of one size"
                )
            objects = ids.astype(np.int32) if mask.ndim == 2 and ids.max() > 1 else None
            out.append(Sample(f"{k:02d}-{img.name}", _rgb_uint8(data.copy()), mask.copy(), objects))
        return out

    def run(self, *_):
        """Start fine-tuning in a thread worker; returns the worker (None if refused)."""
        if self._worker is not None:
            return self._worker
        from .training.finetune import finetune

        try:
            if not self.pairs:
                raise SegDiffError("add at least one image + mask pair")
            samples = self.samples()
            name = str(self.name.value).strip()
            out = user_models_dir() / f".{name}.finetuned.pt"
            user_models_dir().mkdir(parents=True, exist_ok=True)
        except SegDiffError as e:
            return self._fail(str(e))
        self._stop = False
        t0 = time.time()
        budget = float(self.minutes.value)
        blend = float(self.blend.value)
        threshold = str(self.threshold.value)

        def on_step(tr, st):
            self._last = (st["step"], time.time() - t0)

        def work():
            res = finetune(
                str(self.base.value),
                None,
                out,
                minutes=budget,
                name=name,
                samples=samples,
                overwrite=True,
                progress=False,
                on_step=on_step,
                should_stop=lambda: self._stop,
                blend=blend,
                threshold=threshold,
            )
            with contextlib.suppress(OSError):
                out.unlink()  # registered: the copy in the user model directory is the model
            return res

        def ticker():
            while self._worker is not None:
                step, el = getattr(self, "_last", (0, 0.0))
                yield f"step {step}, {el / 60:.1f} of {budget:g} min"
                time.sleep(0.5)

        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_done)
        worker.errored.connect(
            lambda e: self._fail(str(e) if isinstance(e, SegDiffError) else f"{type(e).__name__}: {e}")
        )
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.train_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = f"fine-tuning {self.base.value} on {len(samples)} images for {budget:g} min..."
        worker.start()
        tick = create_worker(ticker, _start_thread=False)
        tick.yielded.connect(lambda text: setattr(self.status, "value", text) if self._worker is not None else None)
        tick.start()
        return worker

    def cancel(self, *_) -> None:
        if self._worker is not None:
            self._stop = True
            self.status.value = "cancelling: keeping the best state so far..."

    def _on_done(self, res) -> None:
        how = "cancelled; kept the best state so far" if res.cancelled else "done"
        score = "" if res.base_score is None else f", validation {res.best_score:.3f} (base {res.base_score:.3f})"
        self.status.value = (
            f"{how}: model {res.name!r}, {res.steps} steps, {res.minutes:.1f} min{score}, blend {res.blend:g}; "
            f"mask threshold {res.threshold_note}"
        )
        self.model_added.emit(res.name)
        from ._widget import LIVE_WIDGETS

        for w in list(LIVE_WIDGETS):
            try:
                w.model.reset_choices()
            except RuntimeError:  # its window was closed: the Qt side is gone
                LIVE_WIDGETS.discard(w)

    def _on_finished(self) -> None:
        self._worker = None
        self.train_button.enabled, self.cancel_button.enabled = True, False
        self.finished.emit(self.status.value)

    def _fail(self, message: str) -> None:
        self.status.value = f"error: {message}"
        show_error(f"SegDiff fine-tuning: {message}")


PROBABILITY_FIRST = "lowest mean probability"
RANK_OBJECTS_BY = (PROBABILITY_FIRST, "highest mean variance")


class ReviewWidget(Container):
    """List the most uncertain places of a run and jump to them in turn.

    Pick a run's ``variance`` layer (and, optionally, its ``labels`` layer to rank objects instead of tiles),
    press **List**: a Points layer ``<variance> review`` marks the places, with their score as the ``score``
    feature: tiles by highest mean variance; objects by lowest mean probability (the run's ``<input>
    probability`` layer; measured to point at wrong objects more often) or by highest mean variance (*rank
    objects by*). **Next** / **Previous** centre the camera on each in turn, so the worst places can be
    corrected first (then fine-tuned on)."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.items: list = []
        self.index = -1
        self._score = "mean variance"
        self.variance = ComboBox(
            label="variance",
            choices=lambda _w=None: [(ly.name, ly) for ly in self._viewer.layers if isinstance(ly, Image)],
        )
        self.objects = ComboBox(
            label="objects",
            choices=lambda _w=None: (
                [("tiles (no objects)", None)] + [(ly.name, ly) for ly in self._viewer.layers if isinstance(ly, Labels)]
            ),
        )
        self.rank_by = ComboBox(label="rank objects by", choices=list(RANK_OBJECTS_BY), value=PROBABILITY_FIRST)
        self.tile = SpinBox(label="tile", value=256, min=16, max=4096, step=16)
        self.top = SpinBox(label="how many", value=10, min=1, max=1000)
        self.list_button = PushButton(text="List")
        self.prev_button = PushButton(text="Previous")
        self.next_button = PushButton(text="Next")
        self.status = Label(value="")
        self.extend(
            [
                self.variance,
                self.objects,
                self.rank_by,
                self.tile,
                self.top,
                self.list_button,
                self.prev_button,
                self.next_button,
                self.status,
            ]
        )
        self.list_button.changed.connect(self.make_list)
        self.next_button.changed.connect(lambda *_: self.go(+1))
        self.prev_button.changed.connect(lambda *_: self.go(-1))
        napari_viewer.layers.events.inserted.connect(lambda e: self.reset_choices())

    def make_list(self, *_) -> None:
        from .review import rank_objects, rank_tiles

        layer = self.variance.value
        if layer is None:
            return show_error("SegDiff review: pick a variance layer")
        var = np.asarray(layer.data)
        self._score = "mean variance"
        try:
            if self.objects.value is not None:
                prob = None
                if self.rank_by.value == PROBABILITY_FIRST:
                    prob, self._score = np.asarray(self._probability_layer(layer).data), "mean probability"
                self.items = rank_objects(var, np.asarray(self.objects.value.data), int(self.top.value), prob)
            else:
                self.items = rank_tiles(var, int(self.tile.value), int(self.top.value))
        except SegDiffError as e:
            self.status.value = f"error: {e}"
            return show_error(f"SegDiff review: {e}")
        pts = np.array([it.center for it in self.items]) if self.items else np.zeros((0, 2))
        name = f"{layer.name} review"
        kw = dict(
            features={"score": [it.score for it in self.items], "rank": list(range(1, len(self.items) + 1))},
            scale=layer.scale,
            translate=layer.translate,
        )
        if name in self._viewer.layers:
            old = self._viewer.layers[name]
            old.data, old.features = pts, kw["features"]
        else:
            self._viewer.add_points(
                pts,
                name=name,
                size=12,
                face_color="transparent",
                border_color="cyan",
                text={"string": "{rank}", "color": "cyan"},
                **kw,
            )
        self.index = -1
        order = "lowest mean probability" if self._score == "mean probability" else "highest mean variance"
        self.status.value = f"{len(self.items)} places, {order} first"
        if self.items:
            self.go(+1)

    def _probability_layer(self, variance_layer):
        """The probability layer of the run that made ``variance_layer`` (named after its input)."""
        names = []
        meta = getattr(variance_layer, "metadata", None) or {}
        if meta.get("input"):
            names.append(f"{meta['input']} probability")
        if variance_layer.name.endswith(" variance"):
            names.append(variance_layer.name[: -len(" variance")] + " probability")
        for n in names:
            if n in self._viewer.layers and isinstance(self._viewer.layers[n], Image):
                return self._viewer.layers[n]
        want = f"'{names[0]}'" if names else "'<input> probability'"
        raise SegDiffError(
            f"ranking objects by mean probability needs the run's probability layer {want}; segment the image "
            "again with SegDiff segmentation, or rank objects by highest mean variance"
        )

    def go(self, step: int) -> None:
        if not self.items:
            return
        self.index = (self.index + step) % len(self.items)
        it = self.items[self.index]
        layer = self.variance.value
        scale = np.asarray(layer.scale)[-2:] if layer is not None else np.ones(2)
        translate = np.asarray(layer.translate)[-2:] if layer is not None else np.zeros(2)
        camera = viewer_camera(self._viewer)
        camera.center = tuple(np.asarray(it.center) * scale + translate)
        y0, x0, y1, x1 = it.box
        extent = max(y1 - y0, x1 - x0, 32) * float(scale.max())
        camera.zoom = 600.0 / extent  # the place fills about 600 screen pixels
        self.status.value = f"{self.index + 1}/{len(self.items)}: {self._score} {it.score:.4f}" + (
            f", object {it.label}" if it.label else ""
        )
