"""The SegDiff trainer: AdamW, EMA, warm-up, gradient accumulation, validation with the user-facing
engine, atomic checkpoints (last + best) and exact resume (model, EMA, optimizer, step, RNG states).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import SegDiffError
from ..config import NetworkConfig, get_preset
from ..diffusion import Diffusion
from ..engine import resolve_device, resolve_precision, segment, warn_if_bf16_emulated
from ..io import atomic_write_bytes
from ..models import SegDiffModel, save_model
from ..network import SegDiffNet, count_parameters
from ..transforms import match_colours_uint8, mean_lab_stats
from .augment import augment_pair, get_augment
from .datasets import Sample, load_dataset, split_samples
from .metrics import all_metrics

#: validation metrics the trainer can select checkpoints by, with their direction (+1: higher is better)
METRIC_DIRECTION = {"dice": 1, "iou": 1, "wcov": 1, "boundf": 1, "calibration": -1, "ece": -1, "loss": -1}


@dataclass
class TrainConfig:
    """Every training setting; saved as ``config.json`` beside the checkpoints."""

    data: str = ""
    format: str = "folder"  # folder | monuseg | vaihingen
    val: str = "0.2"  # fraction, comma-separated names, or a file of names
    preset: str = "cpu-small"
    net: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's NetworkConfig
    # start from a trained model's weights (a shipped model name or a model file); its network
    # configuration replaces preset + net, which must then be left at their defaults or agree
    init: str = ""
    augment: str = "monuseg"
    crop: int = 128
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    # cosine decay of the learning rate from lr (at lr_decay_start) to lr_min (at max_steps); 0 = constant
    lr_decay_start: int = 0
    lr_min: float = 0.0
    max_steps: int = 100000
    max_minutes: float = 0.0  # 0 = no wall-clock limit
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    val_every: int = 500
    val_samples: int = 3
    val_steps: int = 5
    val_tile: int = 256
    select_metric: str = "dice"  # the validation metric that picks the best checkpoint
    ckpt_every: int = 100
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # none | bf16 (CPU or GPU) | fp16 (GPU) | auto (bf16 on a CPU with native bf16, else none)
    threads: int = 0  # 0 = torch default
    out: str = "runs/run"
    # the image encoder G kept as it is: no gradients through it, so a step costs about 0.7 of a full one
    # (G is 44% of the forward FLOPs of cpu-small)
    freeze_encoder: bool = False
    # 0: timesteps uniform over 1..T (Eq. 18). N > 0: half of each batch at the timesteps an N-step respaced
    # sampler evaluates (for 2 steps t = T and t = 1), the other half uniform
    focus_steps: int = 0
    # colour normalisation: every training image moved (Reinhard colour transfer in Lab) to the mean colour
    # statistics of the training images, which the model file then records so that segment() moves every
    # image there too. A warm start from a model that records them keeps that model's statistics.
    colour_norm: bool = False
    # a 2-channel model's interior channel also learns from images without an instance map, where their
    # mask can tell it: every background pixel, and each part of the mask that looks like one object (convex:
    # solidity >= SINGLE_OBJECT_SOLIDITY), peeled like an annotated object. Other parts stay unscored.
    # (nuclei-he: it lowered held-out AJI by 0.008 over three seeds, so that model does not use it; its card)
    interior_from_masks: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), (bool, np.bool_)):
                raise SegDiffError(f"{f.name} must be true or false, got {getattr(self, f.name)!r}")
        if self.select_metric not in METRIC_DIRECTION:
            raise SegDiffError(
                f"select_metric must be one of {', '.join(METRIC_DIRECTION)}, got {self.select_metric!r}"
            )
        if self.amp not in ("none", "bf16", "fp16", "auto"):
            raise SegDiffError(f"amp must be none, bf16, fp16 or auto, got {self.amp!r}")
        for k in (
            "crop",
            "batch_size",
            "grad_accum",
            "max_steps",
            "val_every",
            "ckpt_every",
            "val_samples",
            "val_steps",
            "val_tile",
            "warmup_steps",
            "focus_steps",
        ):
            v, low = getattr(self, k), 0 if k in ("warmup_steps", "focus_steps") else 1
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < low:
                raise SegDiffError(f"{k} must be an integer >= {low}, got {v!r}")
        if not 0 <= self.lr_decay_start < self.max_steps:
            raise SegDiffError(
                f"lr_decay_start must be in [0, max_steps={self.max_steps}), got {self.lr_decay_start} "
                f"(0 keeps the learning rate constant)"
            )
        if not 0 <= self.lr_min <= self.lr:
            raise SegDiffError(f"lr_min must be in [0, lr={self.lr}], got {self.lr_min}")

    def network_config(self) -> NetworkConfig:
        if self.init:
            from ..models import load_model

            cfg = load_model(self.init).config
            if self.net.get("mask_channels", cfg.mask_channels) != cfg.mask_channels:
                if cfg.mask_channels != 1:
                    raise SegDiffError(
                        f"init model {self.init!r} has {cfg.mask_channels} mask channels; only a 1-channel "
                        "model can be widened (net mask_channels)"
                    )  # a 1-channel model is widened: see network.widen_mask_channels
                cfg = dataclasses.replace(cfg, mask_channels=int(self.net["mask_channels"]))
            # input_scale only resizes the data the weights see, so a warm start may change it
            if "input_scale" in self.net:
                scale = self.net["input_scale"]
                if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                    raise SegDiffError(f"net input_scale must be a number, got {scale!r}")
                cfg = dataclasses.replace(cfg, input_scale=float(scale))
            clash = {k: v for k, v in self.net.items() if getattr(cfg, k, None) != v}
            if clash:
                raise SegDiffError(
                    f"net overrides {clash} disagree with the network of init model {self.init!r}; "
                    "a warm start keeps the model's network (input_scale may change): drop them or drop init"
                )
            return cfg
        if not isinstance(self.net, dict):
            raise SegDiffError(f"net must be a mapping of network settings, got {self.net!r}")
        try:
            return get_preset(self.preset, **self.net)
        except TypeError as e:  # an unknown key or a value of the wrong type
            names = sorted(f.name for f in dataclasses.fields(NetworkConfig))
            raise SegDiffError(f"network overrides {self.net} are not valid ({e}); keys: {', '.join(names)}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SegDiffError(f"unknown training config keys {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**d)


def rescale_sample(s: Sample, scale: float) -> Sample:
    if scale == 1.0:
        return s
    import torch.nn.functional as Fn

    H, W = s.mask.shape
    size = (max(1, int(round(H * scale))), max(1, int(round(W * scale))))
    mode = "area" if scale < 1 else "bilinear"
    img = Fn.interpolate(torch.from_numpy(np.moveaxis(s.image, -1, 0)[None].astype(np.float32)), size=size, mode=mode)
    m = Fn.interpolate(torch.from_numpy(s.mask[None, None].astype(np.float32)), size=size, mode=mode)
    return Sample(
        s.name, np.clip(np.moveaxis(img[0].numpy(), 0, -1) + 0.5, 0, 255).astype(np.uint8), m[0, 0].numpy() > 0.5
    )


#: bits of the packed training targets of a 2-channel model (moved together through the augmentation)
MASK_BIT, INTERIOR_BIT, KNOWN_BIT = 1, 2, 4
INTERIOR_WIDTH = 2  # px (at the network's scale) peeled off each object for the interior channel
# a part of a union mask at least this convex (area / convex hull area) is taken for one object: on the 10
# MoNuSeg training images with instance maps 97% of such parts are one nucleus, and they hold 87% of the parts
# that are (0.85: 93% / 96%; 0.93: 99% / 68%)
SINGLE_OBJECT_SOLIDITY = 0.9


#: what a model file records of its colour normalisation (``segment()`` reads them; fine-tunes carry them)
COLOUR_META = ("colour_norm", "colour_strength")


def colour_norm_target(
    cfg: TrainConfig, train_set: list[Sample], init_meta: dict[str, Any] | None = None
) -> tuple[list[list[float]] | None, float]:
    """The Lab statistics a run moves its images to, and how far: a warm start's own (``init_meta``, its file's
    ``colour_norm`` and ``colour_strength``, as ``segment()`` applies them), else with ``cfg.colour_norm`` the
    training images' :func:`~napari_segdiff.transforms.mean_lab_stats`, all the way; else (None, 1)."""
    meta = init_meta or {}
    if meta.get("colour_norm") is not None:
        return np.asarray(meta["colour_norm"], np.float64).tolist(), float(meta.get("colour_strength", 1.0))
    if not cfg.colour_norm:
        return None, 1.0
    return np.round(mean_lab_stats(s.image for s in train_set), 4).tolist(), 1.0


def normalise_colours(s: Sample, target, strength: float = 1.0) -> Sample:
    """The sample with its image moved (``strength`` of the way) to the ``target`` Lab statistics (uint8 kept)."""
    return dataclasses.replace(s, image=match_colours_uint8(s.image, target, strength))


def single_object_parts(mask: np.ndarray, min_solidity: float = SINGLE_OBJECT_SOLIDITY) -> np.ndarray:
    """int32 labels of the connected parts of a union mask that look like one object (solidity at least
    ``min_solidity``); 0 elsewhere, including the parts that look like several touching objects."""
    from skimage.measure import label, regionprops

    parts = label(np.asarray(mask, bool), connectivity=1)
    keep = np.zeros(parts.max() + 1, bool)
    for r in regionprops(parts):
        keep[r.label] = r.solidity >= min_solidity
    return np.where(keep[parts], parts, 0).astype(np.int32)


def pack_targets(s: Sample, scale: float = 1.0, from_masks: bool = False) -> np.ndarray:
    """uint8 map of a sample's targets for a 2-channel model, at ``scale``: the mask, the interior of its
    objects (from the instance map; where there is none, the mask eroded as a stand-in that is fed to the
    network but not scored) and whether the interior is known. ``from_masks``: without an instance map the
    interior is known on the background and on the mask's parts that look like one object
    (:func:`single_object_parts`), peeled as objects."""
    from scipy import ndimage as ndi

    from ..instances import object_interior

    mask = s.mask
    if s.instances is not None:
        inst = s.instances
        known = np.ones(mask.shape, bool)
    elif from_masks:
        single = single_object_parts(mask)
        inst = np.where(mask & (single == 0), single.max() + 1, single).astype(np.int32)  # the rest: one blob
        known = ~mask | (single > 0)
    else:
        inst = mask.astype(np.int32)
        known = np.zeros(mask.shape, bool)
    if scale != 1.0:  # peel the interior at the network's scale
        zoom = (round(mask.shape[0] * scale) / mask.shape[0], round(mask.shape[1] * scale) / mask.shape[1])
        mask, inst, known = (ndi.zoom(a, zoom, order=0) for a in (mask, inst, known))
    interior = object_interior(inst, INTERIOR_WIDTH) & mask
    return (mask * MASK_BIT | interior * INTERIOR_BIT | known * KNOWN_BIT).astype(np.uint8)


def unpack_targets(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(2, h, w) targets in [-1, 1] and their (2, h, w) loss weights from a :func:`pack_targets` crop."""
    x0 = np.stack([(code & MASK_BIT) > 0, (code & INTERIOR_BIT) > 0]).astype(np.float32) * 2.0 - 1.0
    w = np.stack([np.ones(code.shape, bool), (code & KNOWN_BIT) > 0]).astype(np.float32)
    return x0, w


def _save_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


class Trainer:
    def __init__(self, cfg: TrainConfig, samples: list[Sample] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # resolved on the machine that runs (a resumed 'auto' run resolves again where it continues)
        self.amp = cfg.amp
        if cfg.amp == "auto":
            self.amp = "bf16" if resolve_precision("auto", self.device) == "bf16" else "none"
        if self.amp == "bf16":
            warn_if_bf16_emulated(self.device)
        self.net_cfg = cfg.network_config()
        f = self.net_cfg.downsample_factor
        if cfg.crop % f:
            raise SegDiffError(f"crop {cfg.crop} must be a multiple of {f}")
        side = round(cfg.val_tile * self.net_cfg.input_scale)
        if side % f or side < f:
            raise SegDiffError(
                f"val_tile {cfg.val_tile} must be a multiple of {f / self.net_cfg.input_scale:g} (the "
                f"network's downsampling factor {f} at input scale {self.net_cfg.input_scale}), e.g. "
                f"{max(f, int(round(side / f)) * f) / self.net_cfg.input_scale:g}"
            )
        if cfg.val_steps > self.net_cfg.diffusion_steps:
            raise SegDiffError(
                f"val_steps must be at most the model's {self.net_cfg.diffusion_steps} diffusion steps, "
                f"got {cfg.val_steps}"
            )
        samples = samples if samples is not None else load_dataset(cfg.data, cfg.format)
        init_model = None
        if cfg.init:  # the warm start, loaded once: its channels, colour statistics and weights
            from ..models import load_model

            init_model = load_model(cfg.init)
        self.train_set, self.val_set = split_samples(samples, cfg.val, cfg.seed)
        # the network works at input_scale: train on resized images; validation goes through the
        # engine at full resolution (it resizes per tile), scored against the full-resolution masks
        scale = self.net_cfg.input_scale
        # a 2-channel model learns the mask and the interior of its objects: packed per image, at its scale
        self.targets = (
            [pack_targets(s, scale, cfg.interior_from_masks) for s in self.train_set]
            if self.net_cfg.mask_channels == 2
            else None
        )
        if (
            self.targets is not None
            and not any(s.instances is not None for s in self.train_set)
            and not cfg.interior_from_masks
            and not (init_model is not None and init_model.config.mask_channels == 2)  # fine-tuning keeps it
        ):
            raise SegDiffError(
                "a 2-channel model (net mask_channels 2) learns object interiors from instance maps, and no "
                f"training image has one: put them in {cfg.data}/instances/ (one id per object, 0 = background), "
                "or set interior_from_masks to learn them from the masks' single objects"
            )
        self.colour_norm, self.colour_strength = colour_norm_target(
            cfg, self.train_set, init_model.meta if init_model is not None else None
        )
        if self.colour_norm is not None:
            self.train_set = [normalise_colours(s, self.colour_norm, self.colour_strength) for s in self.train_set]
        self.train_set = [rescale_sample(s, scale) for s in self.train_set]
        self.aug = get_augment(cfg.augment)
        torch.manual_seed(cfg.seed)
        self.net = SegDiffNet(self.net_cfg).to(self.device)
        if init_model is not None:
            from ..network import widen_mask_channels

            st = init_model.net.state_dict()
            self.net.load_state_dict(widen_mask_channels(st, self.net_cfg.mask_channels))
        self.ema = copy.deepcopy(self.net).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.diffusion = Diffusion.from_config(self.net_cfg)
        if cfg.focus_steps > self.diffusion.T:
            raise SegDiffError(f"focus_steps must be at most the model's {self.diffusion.T} diffusion steps")
        self.focus_t = None  # the model timesteps a focus_steps-step sampler evaluates
        if cfg.focus_steps:
            sched = self.diffusion.sampling_schedule(cfg.focus_steps)
            self.focus_t = sched.model_t(torch.arange(sched.num_steps))
        if cfg.freeze_encoder:
            for p in self.net.G.parameters():
                p.requires_grad_(False)
        trained = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.rng = np.random.default_rng(cfg.seed)  # data order and augmentation
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # timesteps and noise
        self.step = 0
        self.best = -math.inf
        self._stop = False

    # ------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "best": self.best,
            "np_rng": self.rng.bit_generator.state,
            "gen_rng": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": self.cfg.to_dict(),
            "net_config": self.net_cfg.to_dict(),
            **(self._colour_meta()),
        }

    def _colour_meta(self) -> dict[str, Any]:
        """What a model trained by this run records of its colour normalisation (nothing without one)."""
        if self.colour_norm is None:
            return {}
        return {"colour_norm": self.colour_norm, "colour_strength": self.colour_strength}

    def load_state(self, st: dict[str, Any]) -> None:
        self.net.load_state_dict(st["model"])
        self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"])
        self.step, self.best = int(st["step"]), float(st["best"])
        self.rng.bit_generator.state = st["np_rng"]
        self.gen.set_state(st["gen_rng"])
        torch.set_rng_state(st["torch_rng"])

    def save_checkpoint(self, name: str = "last.pt") -> Path:
        path = self.out / name
        st = self.state()
        atomic_write_bytes(path, lambda f: torch.save(st, f))
        return path

    @classmethod
    def resume(cls, run_dir: str | Path, samples: list[Sample] | None = None, **overrides) -> Trainer:
        run_dir = Path(run_dir)
        ck = run_dir / "last.pt"
        if not ck.exists():
            raise SegDiffError(f"no checkpoint {ck} to resume from")
        try:
            st = torch.load(ck, map_location="cpu", weights_only=True)
            d = dict(st["config"])
        except Exception as e:  # truncated, corrupt, or not a checkpoint
            raise SegDiffError(
                f"{ck} could not be read as a training checkpoint ({type(e).__name__}); if the run "
                f"was killed while writing it, best.pt beside it or a packed copy may still be good"
            ) from None
        d.update(overrides)
        d["out"] = str(run_dir)
        tr = cls(TrainConfig.from_dict(d), samples)
        tr.load_state(st)
        return tr

    # ------------------------------------------------------------ one step
    def make_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images, targets (B, mask_channels, h, w) in [-1, 1] and the targets' loss weights (None: all 1)."""
        c = self.cfg
        imgs, masks, weights = [], [], []
        for _ in range(c.batch_size):
            k = int(self.rng.integers(len(self.train_set)))
            s = self.train_set[k]
            if self.targets is None:
                img, m = augment_pair(s.image, s.mask, c.crop, self.aug, self.rng)
                masks.append(m[None].astype(np.float32) * 2.0 - 1.0)  # masks live in [-1, 1]
            else:
                img, code = augment_pair(s.image, self.targets[k], c.crop, self.aug, self.rng)
                x0, w = unpack_targets(code)
                masks.append(x0)
                weights.append(w)
            imgs.append(np.moveaxis(img, -1, 0) / 127.5 - 1.0)
        return (
            torch.from_numpy(np.stack(imgs).astype(np.float32)).to(self.device),
            torch.from_numpy(np.stack(masks)).to(self.device),
            torch.from_numpy(np.stack(weights)).to(self.device) if weights else None,
        )

    def lr_at(self, step: int) -> float:
        c = self.cfg
        lr = c.lr
        if c.lr_decay_start and step >= c.lr_decay_start:
            frac = min(1.0, (step - c.lr_decay_start) / max(1, c.max_steps - c.lr_decay_start))
            lr = c.lr_min + (c.lr - c.lr_min) * 0.5 * (1.0 + math.cos(math.pi * frac))
        return lr * min(1.0, (step + 1) / max(1, c.warmup_steps))

    def timesteps(self, b: int) -> torch.Tensor | None:
        """The batch's timestep indices: None (uniform, drawn by the loss) or, with focus_steps, half of them
        at the sampler's timesteps."""
        if self.focus_t is None:
            return None
        i = torch.randint(0, self.diffusion.T, (b,), generator=self.gen)
        k = b // 2 if b > 1 else int(torch.randint(0, 2, (1,), generator=self.gen))
        pick = torch.randint(0, len(self.focus_t), (k,), generator=self.gen)
        i[:k] = self.focus_t[pick]
        return i.to(self.device)

    def train_step(self) -> float:
        c = self.cfg
        self.net.train()
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        for _ in range(c.grad_accum):
            img, x0, weight = self.make_batch()
            ctx = torch.autocast(self.device.type, dtype=amp) if amp else torch.autocast("cpu", enabled=False)
            with ctx:
                with torch.no_grad() if c.freeze_encoder else contextlib.nullcontext():
                    feats = self.net.encode_image(img)  # G(I); a frozen G gets no gradients

                def model_fn(x, t, feats=feats):
                    return self.net(x, t, features=feats)

                loss = self.diffusion.training_loss(
                    model_fn, x0, generator=self.gen, weight=weight, i=self.timesteps(len(x0))
                )
            (loss / c.grad_accum).backward()
            total += float(loss.detach()) / c.grad_accum
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), c.grad_clip)
        self.opt.step()
        self.step += 1
        d = min(c.ema_decay, (1 + self.step) / (10 + self.step))  # EMA warm-up
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.net.parameters()):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
            for be, b in zip(self.ema.buffers(), self.net.buffers()):
                be.copy_(b)
        return total

    # ------------------------------------------------------------ validation
    def validate(self, net: SegDiffNet | None = None) -> dict[str, float]:
        c = self.cfg
        if not self.val_set:
            return {}
        model = SegDiffModel(net or self.ema, self.diffusion, name="validation", meta=self._colour_meta())
        rows = []
        for s in self.val_set:
            r = segment(
                s.image,
                model,
                samples=c.val_samples,
                steps=min(c.val_steps, self.diffusion.T),
                seed=c.seed,
                tile=c.val_tile,
                overlap=0.0,
                device=str(self.device),
                runtime="torch",  # the weights change between validations: nothing to convert and cache
            )
            rows.append(all_metrics(r.probability, s.mask))
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}

    def score(self, metrics: dict[str, float], loss: float | None) -> float:
        """What checkpoint selection maximises: the select metric, signed by its direction (validation loss
        stands in when there is no validation set)."""
        name = self.cfg.select_metric
        value = metrics.get(name) if name != "loss" else None
        if value is None:
            return -float(loss if loss is not None else math.inf)
        return METRIC_DIRECTION[name] * float(value)

    # ------------------------------------------------------------ loop
    def _log(self, row: dict[str, Any]) -> None:
        path = self.out / "log.csv"
        fields = [
            "step",
            "time",
            "loss",
            "lr",
            "val_dice",
            "val_iou",
            "val_wcov",
            "val_boundf",
            "val_calibration",
            "val_ece",
        ]
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def _truncate_log(self) -> None:
        """On resume, drop log rows written after the checkpoint (they will be written again)."""
        path = self.out / "log.csv"
        if not path.exists():
            return
        with open(path) as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["step"]) <= self.step]
        if len(keep) != len(rows):
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
                w.writeheader()
                w.writerows(keep)

    def plot(self) -> None:
        try:
            from .plots import plot_log

            plot_log(self.out / "log.csv", self.out / "curves.png")
        except Exception as e:  # plotting must never kill a run
            print(f"[plot skipped: {e}]")

    def _handle_signal(self, signum, frame):
        self._stop = True

    def fit(self, progress: bool = True, on_step=None) -> dict[str, Any]:
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        _save_json(
            self.out / "config.json",
            {
                **c.to_dict(),
                "network": self.net_cfg.to_dict(),
                "train_images": [s.name for s in self.train_set],
                "val_images": [s.name for s in self.val_set],
                "parameters": count_parameters(self.net),
            },
        )
        self._truncate_log()
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in old:
                signal.signal(s, self._handle_signal)
        except ValueError:  # not in the main thread
            old = {}
        t0 = time.time()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=c.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        loss_ema = None
        try:
            while self.step < c.max_steps and not self._stop:
                loss = self.train_step()
                loss_ema = loss if loss_ema is None else 0.98 * loss_ema + 0.02 * loss
                row: dict[str, Any] = {
                    "step": self.step,
                    "time": round(time.time() - t0, 2),
                    "loss": loss,
                    "lr": self.lr_at(self.step - 1),
                }
                out_of_time = bool(c.max_minutes and (time.time() - t0) / 60 > c.max_minutes)
                if self.step % c.val_every == 0 or self.step == c.max_steps or out_of_time:
                    metrics = self.validate()
                    row.update({f"val_{k}": v for k, v in metrics.items()})
                    score = self.score(metrics, loss_ema)
                    if score > self.best:
                        self.best = score
                        self.save_checkpoint("best.pt")
                    if bar is not None:
                        bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                self._log(row)
                if row.get("val_dice") is not None:
                    self.plot()
                if self.step % c.ckpt_every == 0:
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_ema:.4f}")
                if on_step is not None:
                    on_step(self)
                if out_of_time:
                    break
        finally:
            self.save_checkpoint()  # also on Ctrl-C / SIGTERM: resume continues from here
            if bar is not None:
                bar.close()
            for s, h in old.items():
                signal.signal(s, h)
        return {"step": self.step, "best": self.best}


def pack_checkpoint(src: str | Path, dst: str | Path) -> tuple[int, int]:
    """Write a smaller resumable state (to continue a run on another machine): the model
    stays float32, the EMA is stored in float16 (what ``export`` ships anyway) and Adam's moments in
    bfloat16; step, RNG states and config are kept. ``resume`` reads it like any checkpoint (the
    optimizer and the EMA cast back to float32), so training continues, not bit-identically. Returns
    the sizes in bytes of ``src`` and ``dst``."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise SegDiffError(f"pack writes a new file; {dst} is the checkpoint itself: choose another output")
    try:
        st = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or holding code
        raise SegDiffError(
            f"{src} could not be read as a training checkpoint ({type(e).__name__}); give a run folder or its last.pt"
        ) from None
    if not isinstance(st, dict) or not {"model", "ema", "opt", "step"} <= set(st):
        raise SegDiffError(f"{src} is not a training checkpoint (last.pt or best.pt of a run)")
    st["ema"] = {k: v.half() if v.is_floating_point() else v for k, v in st["ema"].items()}
    for s in st["opt"]["state"].values():
        for k in ("exp_avg", "exp_avg_sq"):
            if k in s:
                s[k] = s[k].to(torch.bfloat16)
    st["packed"] = True
    atomic_write_bytes(dst, lambda f: torch.save(st, f))
    return src.stat().st_size, dst.stat().st_size


def blend_states(
    tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor], blend: float
) -> dict[str, torch.Tensor]:
    """``blend * tuned + (1 - blend) * base`` for every floating-point tensor (weight-space ensembling of a
    fine-tuned network with its base); other tensors (counters) are taken from ``tuned``. Networks of other
    shapes are refused."""
    if {k: tuple(v.shape) for k, v in tuned.items()} != {k: tuple(v.shape) for k, v in base.items()}:
        raise SegDiffError(
            "the model to blend with has another network than the run's; blend a run with the model it "
            "started from (or one of the same preset and channels)"
        )
    return {
        k: (blend * v.float() + (1 - blend) * base[k].float()).to(v.dtype) if v.is_floating_point() else v
        for k, v in tuned.items()
    }


def training_colour_stats(run_dir: str | Path) -> list[list[float]]:
    """:func:`~napari_segdiff.transforms.mean_lab_stats` of a run's training images (``config.json``'s
    ``train_images``, validation images left out): what ``segment()`` moves a new image towards with colour
    matching."""
    cfg_path = Path(run_dir) / "config.json"
    if not cfg_path.exists():
        raise SegDiffError(f"{str(run_dir)!r} is not a training run folder (no config.json in it)")
    cfg = json.loads(cfg_path.read_text())
    data = Path(cfg.get("data") or "")
    if not data.exists():
        raise SegDiffError(
            f"colour matching needs the run's training images, and {str(data)!r} (its data) is not there; "
            "run export from the folder the run was trained in"
        )
    wanted = set(cfg.get("train_images") or [])
    images = [s.image for s in load_dataset(data, cfg.get("format", "folder")) if not wanted or s.name in wanted]
    if not images:
        raise SegDiffError(f"none of the run's training images is in {str(data)!r}")
    return np.round(mean_lab_stats(images), 4).tolist()


def export(
    run_dir: str | Path,
    out: str | Path,
    name: str,
    checkpoint: str = "best.pt",
    sampling: dict[str, Any] | None = None,
    extra_meta: dict[str, Any] | None = None,
    blend: float = 1.0,
    base_state: dict[str, torch.Tensor] | None = None,
    colour_match: float | None = None,
) -> tuple[Path, str, bool]:
    """The EMA weights of a checkpoint as a small inference file. fp16 when its outputs stay within
    1e-2 of fp32 on a probe input, else fp32. With ``blend`` < 1 the file holds ``blend * EMA + (1 - blend) *
    base_state`` (weight-space ensembling of a fine-tuned network with its base). ``colour_match`` (0-1]
    records the run's training-image colour statistics (:func:`training_colour_stats`) and that share, so
    ``segment()`` moves each image's colours that far towards them. Returns (path, sha256, half)."""
    run_dir = Path(run_dir)
    ck = run_dir / checkpoint
    if not ck.exists():
        ck = run_dir / "last.pt"
    st = torch.load(ck, map_location="cpu", weights_only=True)
    colour_meta = {k: st[k] for k in COLOUR_META if k in st}
    if colour_match is not None:
        if isinstance(colour_match, bool) or not 0 < float(colour_match) <= 1:
            raise SegDiffError(
                f"colour matching is the share of the way to the training colours, in (0, 1], got {colour_match!r}"
            )
        if colour_meta:
            raise SegDiffError(
                "this run trained on colour-normalised images (or from a model that records its colours): its "
                "file records them already; export it without --colour-match"
            )
        colour_meta = {"colour_norm": training_colour_stats(run_dir), "colour_strength": float(colour_match)}
    cfg = NetworkConfig.from_dict(st["net_config"])
    net = SegDiffNet(cfg)
    state = st["ema"]
    if blend != 1.0:
        if base_state is None:
            raise ValueError("blend < 1 needs the base network's state")
        state = blend_states(state, base_state, blend)
    net.load_state_dict(state)
    net.eval()
    half_net = copy.deepcopy(net)
    for p in half_net.parameters():
        p.data = p.data.half().float()
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    x = torch.randn(2, cfg.mask_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([0, cfg.diffusion_steps // 2])
    with torch.no_grad():
        err = float((net(x, t, image=img) - half_net(x, t, image=img)).abs().max())
    half = err < 1e-2
    meta = {
        "name": name,
        **colour_meta,
        "train_step": int(st["step"]),
        "best_val": float(st["best"]),
        "fp16_max_abs_error": err,
        "sampling": sampling or {},
        **(extra_meta or {}),
    }
    sha = save_model(net, out, half=half, meta=meta)
    return Path(out), sha, half
