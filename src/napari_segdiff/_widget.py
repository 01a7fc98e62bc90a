"""The napari face of napari-segdiff: the "SegDiff segmentation" dock widget.

All magicgui/Qt code of the package lives in this module. The work itself is the library's
:func:`napari_segdiff.iter_segment`, driven slice by slice by :func:`iter_segment_stack` (a plain generator,
no Qt) inside a napari thread worker.
"""

from __future__ import annotations

import secrets
import weakref
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error
from psygnal import Signal

from ._errors import SegDiffError
from .config import NetworkConfig, SamplingConfig, SegmentConfig, TilingConfig, widget_options
from .engine import available_devices, recommended_config, tile_multiple
from .models import SegDiffModel, list_models, load_model
from .objects import result_table, write_csv
from .pixelsize import model_pixel_size
from .stacks import SliceProgress, StackResult, iter_segment_stack, leading_shape

MODEL_FILE = "model file..."
#: segmentation widgets alive in this process: a newly fine-tuned model is offered to each of them
LIVE_WIDGETS: weakref.WeakSet[SegDiffWidget] = weakref.WeakSet()
#: one source for defaults: the library's typed configs
_SAMPLING, _TILING, _SEGMENT = SamplingConfig(), TilingConfig(), SegmentConfig()
_MAX_SEED = 2**31 - 1


# ----------------------------------------------------------------------------------------------------
# The widget


class SegDiffWidget(Container):
    """Segment the chosen image layer with a SegDiff diffusion model.

    Settings default to the library's :class:`~napari_segdiff.SamplingConfig` and
    :class:`~napari_segdiff.TilingConfig`; choosing a model sets *samples* and *steps* to that model's
    recommended values (and caps *steps* at its diffusion steps), as :func:`napari_segdiff.segment` does.
    *seed* -1 draws a random seed (recorded in the outputs' metadata).

    **Run** segments in a background thread, slice by slice for stacks (any leading T/Z axes; for RGB the
    last axis holds the channels), with a progress bar counting tiles. Dask/zarr-backed layers stay lazy,
    and for a multiscale layer level 0 is segmented. **Cancel** stops between tiles; a cancelled run adds
    no layer and changes none.

    Outputs, with the input's scale and translate and the run's settings (model, sha256, samples, steps,
    overlap, seed, device, seconds, ...) in each layer's ``metadata``:

    - ``"<input> probability"``: Image, mean of the samples in [0, 1] (added hidden: toggle it on);
    - ``"<input> variance"``: Image (magma, additive), per-pixel variance of the samples: the model's
      uncertainty;
    - ``"<input> mask"``: Labels, probability > threshold;
    - ``"<input> labels"``: Labels, one id per object, when *instances* is on (the status line counts them);
      its ``features`` hold one row per object (``napari_segdiff.objects``: area, centroid, axes,
      eccentricity, mean probability and mean variance), shown for the object under the cursor.

    *pixel size*: 0 takes the layer's scale as the image's pixel size (in the model's unit) when the scale is
    not 1, and otherwise uses the image as it is; a value > 0 overrides it. Either way the image is resampled
    to the model's native pixel size per tile and the outputs come back on the layer's grid; the status line
    says which pixel size was used.

    Running again on the same input **replaces the data of those three layers** when layers of those
    names (and kinds) exist, keeping their display settings; otherwise it adds them.

    For scripts and tests, :meth:`set_model` puts a :class:`~napari_segdiff.SegDiffModel` object in the
    model list, :meth:`run` returns the worker, and two signals are emitted on the main thread:
    ``progressed(SliceProgress)`` per tile and ``run_finished(str)`` at the end of every run (with the
    status text: done, cancelled or error).
    """

    progressed = Signal(object)
    run_finished = Signal(str)

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._models: dict[str, SegDiffModel] = {}  # loaded models by model-list entry (or file path)
        self._in_memory: list[str] = []  # entries added by set_model
        self._worker = None
        self._pbar: progress | None = None
        self._table: tuple[str, dict] | None = None  # the last run's objects: (input name, table)
        self._build()
        self._on_model_change()
        LIVE_WIDGETS.add(self)

    # -- layout ------------------------------------------------------------------------------------

    def _build(self) -> None:
        self.image = ComboBox(
            label="image",
            choices=self._image_layers,
            tooltip="Image layer to segment (grey or RGB; stacks go slice by slice)",
        )
        self.model = ComboBox(
            label="model",
            choices=self._model_choices,
            tooltip="A shipped model, or 'model file...' for a .pt file from `napari-segdiff-train export`",
        )
        self.model_file = FileEdit(label="model file", mode="r", filter="*.pt", visible=False)
        # ranges, steps and help come from the one parameter table on the config dataclasses
        self.samples = SpinBox(value=_SAMPLING.samples, **widget_options(SamplingConfig, "samples"))
        self.steps = SpinBox(
            value=_SAMPLING.steps, **widget_options(SamplingConfig, "steps", max=NetworkConfig().diffusion_steps)
        )
        self.sampler = ComboBox(value=_SAMPLING.sampler, **widget_options(SamplingConfig, "sampler"))
        self.eta = FloatSpinBox(value=_SAMPLING.eta, visible=False, **widget_options(SamplingConfig, "eta"))
        self.tile = SpinBox(value=_TILING.tile, **widget_options(TilingConfig, "tile"))
        self.overlap = FloatSpinBox(value=_TILING.overlap, **widget_options(TilingConfig, "overlap"))
        self.batch_size = SpinBox(value=_TILING.batch_size, **widget_options(TilingConfig, "batch_size"))
        self.threshold = FloatSpinBox(value=_SAMPLING.threshold, **widget_options(SamplingConfig, "threshold"))
        self.object_threshold = FloatSpinBox(
            value=_SAMPLING.object_threshold, visible=False, **widget_options(SamplingConfig, "object_threshold")
        )
        self.device = ComboBox(
            value=_SEGMENT.device, **widget_options(SegmentConfig, "device", choices=available_devices())
        )
        self.precision = ComboBox(value=_SEGMENT.precision, **widget_options(SegmentConfig, "precision"))
        self.runtime = ComboBox(value=_SEGMENT.runtime, **widget_options(SegmentConfig, "runtime"))
        self.seed = SpinBox(
            label="seed",
            value=-1 if _SAMPLING.seed is None else _SAMPLING.seed,
            min=-1,
            max=_MAX_SEED,
            tooltip="Random seed of the sampling noise; -1 draws one",
        )
        self.pixel_size = FloatSpinBox(
            label="pixel size",
            value=0.0,
            min=0.0,
            max=1e6,
            step=0.01,
            tooltip="The image's pixel size in the model's unit; 0 = the layer's scale (when it is not 1)",
        )
        self.instances = CheckBox(
            text="instances (one label per object)",
            value=False,
            tooltip="Add a Labels layer with one id per object, by the model's instance "
            "method (nuclei-he: a watershed seeded at the peaks of the interior channel it generates; "
            "buildings-all: h-maxima watershed; buildings-aerial: connected components)",
        )
        opts = widget_options(SamplingConfig, "tta")
        self.tta = CheckBox(text=opts["label"], value=_SAMPLING.tta, tooltip=opts["tooltip"])
        opts = widget_options(TilingConfig, "skip_empty")
        self.skip_empty = CheckBox(text=opts["label"], value=_TILING.skip_empty, tooltip=opts["tooltip"])
        opts = widget_options(TilingConfig, "colour_match")
        self.colour_match = CheckBox(text=opts["label"], value=_TILING.colour_match, tooltip=opts["tooltip"])
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.save_table_button = PushButton(
            text="Save objects table (CSV)...",
            visible=False,
            tooltip="One row per object of the last run with instances: area, centroid, axes, eccentricity, mean "
            "probability and mean variance",
        )
        self.status = Label(value="")
        self.status.native.setWordWrap(True)  # a long status wraps instead of widening the dock
        self.extend(
            [
                self.image,
                self.model,
                self.model_file,
                self.samples,
                self.steps,
                self.sampler,
                self.eta,
                self.tta,
                self.tile,
                self.overlap,
                self.batch_size,
                self.threshold,
                self.device,
                self.precision,
                self.runtime,
                self.seed,
                self.pixel_size,
                self.instances,
                self.object_threshold,
                self.skip_empty,
                self.colour_match,
                self.run_button,
                self.cancel_button,
                self.save_table_button,
                self.status,
            ]
        )
        self.model.changed.connect(self._on_model_change)
        self.model_file.changed.connect(self._on_model_change)
        self.sampler.changed.connect(lambda *_: setattr(self.eta, "visible", self.sampler.value == "ddim"))
        self.instances.changed.connect(lambda *_: setattr(self.object_threshold, "visible", self.instances.value))
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.save_table_button.changed.connect(lambda *_: self.save_table())

    def _image_layers(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _model_choices(self, _widget=None) -> list[str]:
        return [*self._in_memory, *list_models(), MODEL_FILE]

    # -- models ------------------------------------------------------------------------------------

    def set_model(self, model: SegDiffModel) -> str:
        """Offer an in-memory model in the model list and select it; returns its list entry."""
        key = f"{model.name} (in memory)"
        self._models[key] = model
        if key not in self._in_memory:
            self._in_memory.insert(0, key)
        self.model.reset_choices()
        self.model.value = key
        self._on_model_change()
        return key

    def _model_key(self) -> str:
        """The chosen model: a model-list entry or a file path."""
        if self.model.value != MODEL_FILE:
            return self.model.value
        path = str(self.model_file.value or "")
        if not path or path == ".":
            raise SegDiffError("choose a model file (.pt) or a shipped model")
        return path

    def _on_model_change(self, *_) -> None:
        self.model_file.visible = self.model.value == MODEL_FILE
        try:
            key = self._model_key()
        except SegDiffError:
            return
        try:
            mdl = self._models.get(key) or load_model(key)
        except SegDiffError as e:
            self.status.value = f"model: {e}"
            return
        self._models[key] = mdl
        rec_cfg = recommended_config(mdl)  # the model's recommended settings, as segment() uses
        rec = rec_cfg.sampling
        self.steps.max = mdl.diffusion.T
        self.samples.value = rec.samples
        self.steps.value = rec.steps if rec.steps is not None else mdl.diffusion.T
        self.sampler.value = rec.sampler
        self.eta.value = rec.eta
        self.tta.value = rec.tta
        self.threshold.value = rec.threshold
        self.object_threshold.value = rec.object_threshold
        self.overlap.value = rec_cfg.tiling.overlap
        # the tile must reach the network as a multiple of its downsampling factor: the step follows the model
        self.tile.step = tile_multiple(mdl)
        self.tile.min = tile_multiple(mdl)
        self.tile.value = rec_cfg.tiling.tile
        native = model_pixel_size(mdl.meta)
        self.pixel_size.tooltip = (
            f"The image's pixel size in {native[1]} (the model's native: {native[0]:g} "
            f"{native[1]}); 0 = the layer's scale (when it is not 1)"
            if native
            else "this model does not record its pixel size: images are used as they are"
        )
        self.status.value = (
            f"model {mdl.name}"
            + (f" ({mdl.sha256[:12]})" if mdl.sha256 else "")
            + (f", native pixel size {native[0]:g} {native[1]}" if native else "")
        )

    # -- running -----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._worker is not None

    def engine_kwargs(self) -> dict[str, Any]:
        """The widget's settings as :func:`iter_segment` keywords, validated by the library's configs."""
        seed = secrets.randbits(31) if self.seed.value < 0 else int(self.seed.value)
        sampling = SamplingConfig(
            samples=int(self.samples.value),
            steps=int(self.steps.value),
            sampler=str(self.sampler.value),
            eta=float(self.eta.value),
            tta=bool(self.tta.value),
            seed=seed,
            threshold=float(self.threshold.value),
            object_threshold=float(self.object_threshold.value),
        )
        tiling = TilingConfig(
            tile=int(self.tile.value),
            overlap=float(self.overlap.value),
            batch_size=int(self.batch_size.value),
            skip_empty=bool(self.skip_empty.value),
            colour_match=bool(self.colour_match.value),
        )
        cfg = SegmentConfig(
            sampling=sampling,
            tiling=tiling,
            device=str(self.device.value),
            precision=str(self.precision.value),
            runtime=str(self.runtime.value),
        )
        keys = ("samples", "steps", "sampler", "eta", "tta", "seed", "threshold", "object_threshold")
        kw = {k: getattr(sampling, k) for k in keys}
        kw.update({k: getattr(tiling, k) for k in ("tile", "overlap", "batch_size", "skip_empty", "colour_match")})
        return dict(kw, device=cfg.device, precision=cfg.precision, runtime=cfg.runtime)

    def pixel_size_for(self, layer, model: SegDiffModel | None) -> tuple[float | None, str]:
        """(pixel size to pass, a sentence saying where it came from) for ``layer`` and ``model``."""
        native = model_pixel_size(model.meta) if model is not None else None
        if float(self.pixel_size.value) > 0:
            if native is None:
                raise SegDiffError("this model does not record its pixel size: set pixel size to 0")
            return float(self.pixel_size.value), f"pixel size {self.pixel_size.value:g} {native[1]} (set here)"
        scale = float(np.asarray(layer.scale)[-1])
        if native is None or np.isclose(scale, 1.0):
            return None, "pixel size: the image as it is" + (
                f" (model's native {native[0]:g} {native[1]}; layer scale 1)" if native else ""
            )
        return scale, f"pixel size {scale:g} {native[1]} (the layer's scale)"

    def run(self, *_):
        """Start segmenting the chosen layer in a thread worker; returns the worker (None if not started)."""
        if self.running:
            return self._worker
        layer = self.image.value
        if layer is None:
            return self._fail("no image layer to segment: open an image first")
        try:
            key = self._model_key()
            kwargs = self.engine_kwargs()
            data = layer.data[0] if layer.multiscale else layer.data
            leading_shape(tuple(data.shape), layer.rgb)
            px, px_text = self.pixel_size_for(layer, self._models.get(key))
        except SegDiffError as e:
            return self._fail(str(e))
        if px is not None:
            kwargs["pixel_size"] = px
        target = {
            "name": layer.name,
            "scale": np.array(layer.scale),
            "translate": np.array(layer.translate),
            "pixel_text": px_text,
        }
        worker = create_worker(
            iter_segment_stack,
            data,
            bool(layer.rgb),
            self._models.get(key, key),
            instances=bool(self.instances.value),
            _start_thread=False,
            _ignore_errors=True,
            **kwargs,
        )
        # the generator yields progress per tile and, last, its StackResult (the package's one protocol)
        worker.yielded.connect(lambda item: self._on_item(key, target, item))
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._pbar = progress(total=0, desc=f"SegDiff {layer.name}")
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = f"segmenting {layer.name}..."
        worker.start()
        return worker

    def cancel(self, *_) -> None:
        """Stop the running segmentation after the tile in progress; nothing is added or changed."""
        if self._worker is not None:
            self.status.value = "cancelling..."
            self._worker.quit()

    def _fail(self, message: str) -> None:
        self.status.value = f"error: {message}"
        show_error(f"SegDiff: {message}")

    def _on_item(self, key: str, target: dict[str, Any], item: SliceProgress | StackResult) -> None:
        if isinstance(item, StackResult):
            if self._worker is not None and not self._worker.abort_requested:
                self._on_done(key, target, item)
        else:
            self._on_progress(item)

    def _on_progress(self, p: SliceProgress) -> None:
        # napari's progress bar calls QApplication.processEvents(), so later signals (even `finished`) can
        # be handled inside this call: write the status first and look the bar up again before each use
        worker = self._worker
        if worker is None or worker.abort_requested:
            return
        where = f"slice {p.index + 1}/{p.slices}, " if p.slices > 1 else ""
        self.status.value = f"{where}tile {p.tile.done}/{p.tile.total}"
        self.progressed.emit(p)

        def bar() -> progress | None:
            return self._pbar if self._worker is worker else None

        if bar() is not None and bar().total != p.total:
            bar().total = p.total
        if bar() is not None and p.slices > 1 and p.tile.done == 1:
            bar().set_description(f"SegDiff slice {p.index + 1}/{p.slices}")
        if bar() is not None:
            bar().update(p.done - bar().n)

    def _on_error(self, exc: Exception) -> None:
        self._fail(str(exc) if isinstance(exc, SegDiffError) else f"{type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        if self._worker is not None and self._worker.abort_requested:
            self.status.value = "cancelled: no layer was added or changed"
        if self._pbar is not None:
            self._pbar.close()
        self._pbar = None
        self._worker = None
        self.run_button.enabled, self.cancel_button.enabled = True, False
        self.run_finished.emit(self.status.value)

    def _on_done(self, key: str, target: dict[str, Any], result: StackResult) -> None:
        self._models.setdefault(key, result.model)
        meta = {**result.info, "input": target["name"]}
        geo = {"scale": target["scale"], "translate": target["translate"]}
        name = target["name"]
        self._put(
            Image,
            f"{name} probability",
            result.probability,
            meta,
            geo,
            {"colormap": "gray", "contrast_limits": (0.0, 1.0), "visible": False},
        )
        self._put(Image, f"{name} variance", result.variance, meta, geo, {"colormap": "magma", "blending": "additive"})
        self._put(Labels, f"{name} mask", result.mask, meta, geo, {"opacity": 0.6})
        objects = ""
        self._table = None
        if result.labels is not None:
            # one row per object (area, axes, mean probability and variance): napari shows the row of the
            # object under the cursor, and layer.features holds the table for scripts
            table = result_table(result)
            self._table = (name, table)
            features = {"index": table["label"], **table}
            self._put(Labels, f"{name} labels", result.labels, meta, geo, {"opacity": 0.6}, features)
            objects = f", {meta['objects']} objects (hover one for its size and uncertainty)"
        self.save_table_button.visible = result.labels is not None
        if meta.get("skipped_tiles"):
            objects += f", {meta['skipped_tiles']} of {meta['tiles']} tiles empty (not sampled)"
        self.status.value = (
            f"done: {meta['model']}, {meta['samples']} samples x {meta['steps']} steps, "
            f"{meta['seconds']:.1f} s{objects}; {target['pixel_text']}"
        )

    def save_table(self, path: str | None = None):
        """Write the last run's object table (one CSV row per object) to ``path``, or ask where (a file dialog);
        a name without ``.csv`` gets it, so an image is never written over. Returns the path written, or None."""
        from pathlib import Path

        if self._table is None:
            self.status.value = "no objects to save: run with instances first"
            return None
        name, table = self._table
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path, _ = QFileDialog.getSaveFileName(
                self.native, "Save objects table", f"{name} objects.csv", "CSV (*.csv)"
            )
            if not path:
                return None
        out = Path(path)
        if out.suffix.lower() != ".csv":
            out = out.with_name(out.name + ".csv")
        try:
            write_csv(out, table)
        except OSError as e:
            self.status.value = f"not saved: {e}"
            return None
        self.status.value = f"saved {len(table['label'])} objects of {name} to {out}"
        return out

    def _put(self, kind, name: str, data, meta, geo, new_kwargs, features=None) -> None:
        """Update the layer ``name`` of this kind in place, or add it."""
        layers = self._viewer.layers
        old = layers[name] if name in layers else None  # noqa: SIM401 (a LayerList has no .get)
        if isinstance(old, kind):
            old.data = data
            old.scale, old.translate = geo["scale"], geo["translate"]
            old.metadata = dict(meta)
            if features is not None:
                old.features = features
            if kind is Image and name.endswith("variance"):
                old.reset_contrast_limits()
            return
        add = self._viewer.add_labels if kind is Labels else self._viewer.add_image
        extra = {} if features is None else {"features": features}
        add(data, name=name, metadata=dict(meta), **geo, **new_kwargs, **extra)
