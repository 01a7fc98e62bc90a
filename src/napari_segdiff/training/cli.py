"""`napari-segdiff-train`: train, resume, export and evaluate SegDiff models.

napari-segdiff-train train --config training/nuclei-he/recipe.json [--key value ...]
napari-segdiff-train train --data DIR --preset cpu-small --out runs/x --net base_channels=48
napari-segdiff-train resume runs/x [--max-minutes 60]
napari-segdiff-train export runs/x --name my-model -o my-model.pt
napari-segdiff-train pack runs/x -o training/x/last.pt   (a smaller resumable copy to commit)
napari-segdiff-train eval --model my-model.pt --data DIR [--names a,b] [--samples 5 --steps 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from .._errors import SegDiffError
from ..config import PRECISIONS, RUNTIMES
from .finetune import BLEND_HELP, THRESHOLD_HELP
from .trainer import TrainConfig


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _bool(text: str) -> bool:
    """true/false, yes/no, on/off or 1/0 (argparse's type for the recipe's switches)."""
    v = text.strip().lower()
    if v in ("true", "yes", "on", "1"):
        return True
    if v in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_config_flags(p: argparse.ArgumentParser, skip=("net",)) -> None:
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        if isinstance(f.default, bool):
            kind = _bool
        elif isinstance(f.default, (int, float)):
            kind = type(f.default)
        else:
            kind = str
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            type=kind,
            help=f"(default {f.default!r})",
        )


def _overrides(args) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names and k != "net" and v is not None}


def _net_overrides(items: list[str] | None) -> dict[str, Any]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise SegDiffError(f"--net takes key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = _parse_value(v)
    return out


def network_description(cfg: TrainConfig, net_cfg) -> str:
    """What a run trains: the warm start's network, or the nearest preset (the run's own on a tie) named with
    the fields that differ from it (a recipe's ``net`` may override every field, so the name alone can mislead)."""
    if cfg.init:
        return f"the network of {cfg.init} (input scale {net_cfg.input_scale:g})"
    from ..config import PRESETS

    mine = dataclasses.asdict(net_cfg)

    def changed(name: str) -> list[str]:
        base = dataclasses.asdict(PRESETS[name])
        return [f"{k}={v}" for k, v in mine.items() if base.get(k) != v]

    diffs = {n: changed(n) for n in [cfg.preset] + sorted(n for n in PRESETS if n != cfg.preset)}
    name = min(diffs, key=lambda n: len(diffs[n]))  # the first of the nearest: the run's own on a tie
    return name + (f" with {', '.join(diffs[name])}" if diffs[name] else "")


def cmd_train(args) -> int:
    from .trainer import Trainer

    d: dict[str, Any] = {}
    if args.config:
        try:
            recipe = json.loads(Path(args.config).read_text())
        except OSError as e:
            raise SegDiffError(f"cannot read --config {args.config!r}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise SegDiffError(
                f"--config {args.config!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
            ) from None
        if not isinstance(recipe, dict):
            raise SegDiffError(
                f"--config {args.config!r} must hold a JSON object of settings, got {type(recipe).__name__}"
            )
        d.update(recipe)
    d.update(_overrides(args))
    d["net"] = {**d.get("net", {}), **_net_overrides(args.net)}
    cfg = TrainConfig.from_dict(d)
    if Path(cfg.out, "last.pt").exists():
        raise SegDiffError(
            f"{cfg.out} already holds a run; continue it with `napari-segdiff-train resume {cfg.out}` "
            "or choose another --out"
        )
    tr = Trainer(cfg)
    print(
        f"training {network_description(cfg, tr.net_cfg)} ({sum(p.numel() for p in tr.net.parameters()):,} "
        "parameters) on "
        f"{len(tr.train_set)} images, validating on {len(tr.val_set)}; device {tr.device}; run dir {cfg.out}"
    )
    res = tr.fit()
    print(f"stopped at step {res['step']}; best validation {cfg.select_metric} {res['best']:.4f}")
    return 0


def cmd_resume(args) -> int:
    from .trainer import Trainer

    tr = Trainer.resume(args.run, **_overrides(args))
    print(f"resuming {args.run} at step {tr.step}")
    res = tr.fit()
    print(f"stopped at step {res['step']}; best validation {tr.cfg.select_metric} {res['best']:.4f}")
    return 0


def cmd_pack(args) -> int:
    from ..io import check_file_output
    from .trainer import pack_checkpoint

    src = Path(args.run) / "last.pt" if Path(args.run).is_dir() else Path(args.run)
    if not src.exists():
        raise SegDiffError(f"no checkpoint {str(src)!r}: give a run folder (with last.pt) or a checkpoint file")
    check_file_output(args.output, [src], args.overwrite, (".pt",))
    a, b = pack_checkpoint(src, args.output)
    print(
        f"wrote {args.output}: {b / 2**20:.1f} MiB (from {a / 2**20:.1f} MiB); resume it by copying it to "
        f"RUN/last.pt beside RUN/config.json"
    )
    return 0


def parse_instances(text: str) -> dict:
    """``METHOD[,key=value...]`` (e.g. ``hmaxima,h=0.5,min_area=10``) as the model file's instance settings."""
    from ..instances import METHODS

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise SegDiffError("--instances: give a method, e.g. hmaxima,h=0.5,min_area=10 or interior,seed_threshold=0.5")
    method, *pairs = parts
    if method not in METHODS:
        raise SegDiffError(f"--instances: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    out: dict = {"method": method}
    allowed = {"min_area", "min_distance", "h", "seed_threshold", "sigma"}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or k not in allowed:
            raise SegDiffError(f"--instances: expected key=value with a key of {sorted(allowed)}, got {p!r}")
        try:
            out[k] = float(v)
        except ValueError:
            raise SegDiffError(f"--instances: {k} must be a number, got {v!r}") from None
        if out[k] < 0:
            raise SegDiffError(f"--instances: {k} must be >= 0, got {v!r}")
    return out


def cmd_export(args) -> int:
    from ..models import WEIGHTS_DIR
    from .trainer import export

    sampling = {"samples": args.samples, "steps": args.steps, **({"tta": True} if args.tta else {})}
    if args.threshold is not None:
        if not 0 < args.threshold < 1:
            raise SegDiffError(f"--threshold must be between 0 and 1 (exclusive), got {args.threshold}")
        sampling["threshold"] = args.threshold
    tiling = {k: v for k, v in (("tile", args.tile), ("overlap", args.overlap)) if v is not None}
    from ..io import check_file_output

    if not Path(args.run).is_dir() or not (Path(args.run) / "config.json").exists():
        raise SegDiffError(f"{args.run!r} is not a training run folder (no config.json in it)")
    if args.samples < 1 or args.steps < 1:
        raise SegDiffError(f"--samples and --steps must be >= 1, got {args.samples} and {args.steps}")
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise SegDiffError(f"--overlap must be in [0, 1), got {args.overlap}")
    out = args.output or (WEIGHTS_DIR / f"{args.name}.pt" if args.install else f"{args.name}.pt")
    check_file_output(out, [Path(args.run) / "last.pt", Path(args.run) / "best.pt"], args.overwrite, (".pt",))
    meta = {"tiling": tiling}
    if args.pixel_size is not None:
        from ..pixelsize import check_pixel_size, unit_metres

        meta["pixel_size"] = check_pixel_size(args.pixel_size)
        unit_metres(args.pixel_unit)
        meta["pixel_unit"] = args.pixel_unit
    if args.description:
        meta["description"] = args.description
    if args.instances:
        meta["instances"] = parse_instances(args.instances)
    base_state = None
    if args.blend != 1.0 or args.blend_base:
        from ..models import load_model
        from .finetune import _is_blend

        if not _is_blend(args.blend) or args.blend == 1.0 or not args.blend_base:
            raise SegDiffError(
                "--blend A --blend-base MODEL writes A x the run's weights + (1 - A) x MODEL's: give both, "
                f"with A in (0, 1); got --blend {args.blend:g} and --blend-base {args.blend_base or 'none'}"
            )
        base = load_model(args.blend_base, device="cpu")
        base_state = base.net.state_dict()
        meta["blend"] = {"share": args.blend, "base": base.name, "base_sha256": base.sha256}
    path, sha, half = export(
        args.run,
        out,
        args.name,
        checkpoint=args.checkpoint,
        sampling=sampling,
        extra_meta=meta,
        colour_match=args.colour_match,
        blend=args.blend,
        base_state=base_state,
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {'fp16' if half else 'fp32'})\nsha256 {sha}")
    if args.install:
        from ..models import register_model

        register_model(args.name, path, sha, args.description or "")
        print(f"registered {args.name!r} as a shipped model")
    return 0


def cmd_finetune(args) -> int:
    from .finetune import finetune

    res = finetune(
        args.model,
        args.data,
        args.output,
        minutes=args.minutes,
        steps=args.steps,
        names=args.names,
        name=args.name,
        overwrite=args.overwrite,
        seed=args.seed,
        threads=args.threads,
        progress=not args.quiet,
        blend=args.blend,
        threshold=args.threshold,
    )
    score = (
        ""
        if res.base_score is None
        else f"; validation {res.best_score:.4f} (base model {res.base_score:.4f}) on {len(res.val_images)} images"
    )
    print(
        f"wrote {res.path} ({res.steps} steps, {res.minutes:.1f} min, kept the {res.kept} state{score}, "
        f"blend {res.blend:g})"
    )
    print(f"mask threshold {res.threshold_note}")
    if res.name:
        print(f"registered user model {res.name!r}: use it by name in segment(), the CLI and the napari widget")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_folder

    evaluate_folder(
        args.model,
        args.data,
        fmt=args.format,
        names=args.names,
        samples=args.samples,
        steps=args.steps,
        seed=args.seed,
        overlap=args.overlap,
        tile=args.tile,
        out_json=args.json,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        tta=args.tta,
        threshold=args.threshold,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="napari-segdiff-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="start a training run")
    t.add_argument("--config", help="a JSON recipe (e.g. training/nuclei-he/recipe.json); flags override it")
    t.add_argument("--net", nargs="*", metavar="KEY=VALUE", help="network overrides, e.g. base_channels=48")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)
    r = sub.add_parser("resume", help="continue a run exactly where its last checkpoint left it")
    r.add_argument("run")
    for k in (
        "max_steps",
        "max_minutes",
        "val_every",
        "val_samples",
        "val_steps",
        "val_tile",
        "ckpt_every",
        "device",
        "threads",
        "data",
        "amp",
        "lr",
        "lr_decay_start",
        "lr_min",
    ):
        f = {f.name: f for f in dataclasses.fields(TrainConfig)}[k]
        r.add_argument(
            f"--{k.replace('_', '-')}",
            dest=k,
            default=None,
            type=type(f.default) if not isinstance(f.default, str) else str,
        )
    r.set_defaults(func=cmd_resume)
    k = sub.add_parser(
        "pack",
        help="a smaller resumable copy of a run's last.pt (float16 EMA, bfloat16 Adam "
        "moments), to continue the run on another machine",
    )
    k.add_argument("run", help="a run folder (its last.pt) or a checkpoint file")
    k.add_argument("-o", "--output", required=True)
    k.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    k.set_defaults(func=cmd_pack)
    e = sub.add_parser("export", help="turn a run's best EMA checkpoint into an inference model file")
    e.add_argument("run")
    e.add_argument("--name", required=True)
    e.add_argument("-o", "--output")
    e.add_argument("--checkpoint", default="best.pt")
    e.add_argument("--samples", type=int, default=5, help="recommended samples stored in the file")
    e.add_argument("--steps", type=int, default=10, help="recommended steps stored in the file")
    e.add_argument("--description")
    e.add_argument(
        "--blend",
        type=float,
        default=1.0,
        help="write BLEND x the run's EMA weights + (1 - BLEND) x those of --blend-base, a model with the same "
        "network (weight-space ensembling, as finetune's --blend); default 1: the run's weights",
    )
    e.add_argument("--blend-base", dest="blend_base", default=None, help="the model (name or file) to blend with")
    e.add_argument("--tta", action="store_true", help="recommend test-time augmentation (stored in the file)")
    e.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="recommended threshold of the probability for the mask (stored in the file; default: the library's)",
    )
    e.add_argument("--tile", type=int, default=None, help="recommended tile stored in the file")
    e.add_argument("--overlap", type=float, default=None, help="recommended overlap stored in the file")
    e.add_argument(
        "--pixel-size",
        dest="pixel_size",
        type=float,
        default=None,
        help="the pixel size the model was trained at (recorded in the file; segment() resamples to it)",
    )
    e.add_argument("--pixel-unit", dest="pixel_unit", default="um", help="unit of --pixel-size: um or m (default um)")
    e.add_argument(
        "--instances",
        default=None,
        help="instance method stored in the file, METHOD[,key=value...], e.g. hmaxima,h=0.5,min_area=10 "
        "or interior,seed_threshold=0.5 for a 2-channel model (default: connected components; a 2-channel "
        "model's own interior seeds)",
    )
    e.add_argument(
        "--colour-match",
        dest="colour_match",
        type=float,
        default=None,
        metavar="S",
        help="record the training images' mean Lab colour statistics, so segment() moves each image's colours "
        "this share of the way to them (0-1; buildings-all: 0.5; default: none)",
    )
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.add_argument(
        "--install",
        action="store_true",
        help="developers: write into the package's weights/ folder and register it by name",
    )
    e.set_defaults(func=cmd_export)
    f = sub.add_parser(
        "finetune",
        help="adapt a trained model to your own images in minutes",
        description="napari-segdiff-train finetune --model NAME|FILE --data DIR [--names FILE] "
        "(--minutes M | --steps S) -o OUT.pt [--name NAME]",
    )
    f.add_argument("--model", required=True, help="the model to start from: a shipped or user model name, or a file")
    f.add_argument(
        "--data",
        required=True,
        help="a folder with images/ and masks/ (same file names; a mask may be 0/255, 0/1 or instance labels)",
    )
    f.add_argument("--names", default=None, help="a file listing the image names to use (or comma-separated names)")
    budget = f.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock budget")
    budget.add_argument("--steps", type=int, help="training steps")
    f.add_argument("-o", "--output", required=True, help="the new model file (.pt)")
    f.add_argument("--name", default=None, help="also register it as a user model under this name")
    f.add_argument("--overwrite", action="store_true", help="replace an existing output file or user model")
    f.add_argument("--blend", type=float, default=None, help=BLEND_HELP)
    f.add_argument("--threshold", default="keep", help=THRESHOLD_HELP)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(func=cmd_finetune)
    add_eval_parser(sub)
    return p


def add_eval_parser(sub) -> None:
    """The ``eval`` subcommand, shared by napari-segdiff-train and napari-segdiff."""
    v = sub.add_parser(
        "eval",
        help="score a model on a folder of images and masks (Dice, IoU, WCov, BoundF, "
        "calibration, error AUROC of the variance, and AJI/PQ/F1 where instance maps exist), per image and the mean",
    )
    v.add_argument("--model", default=None, help="shipped model name or model file (default: the default model)")
    v.add_argument("--data", required=True)
    v.add_argument("--format", default="folder")
    v.add_argument("--names", default=None, help="comma-separated image names or a file listing them")
    v.add_argument("--samples", type=int, default=None)
    v.add_argument("--steps", type=int, default=None)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--overlap", type=float, default=None)
    v.add_argument("--tile", type=int, default=None, help="window size in pixels (default: the model's recommendation)")
    v.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="test-time augmentation on/off (default: the model's recommendation)",
    )
    v.add_argument("--threshold", type=float, default=None, help="mask threshold (default: the model's recommendation)")
    v.add_argument("--device", default="auto")
    v.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto (what segment() uses on this machine: bf16 where the CPU has it natively), fp32 or bf16",
    )
    v.add_argument(
        "--runtime",
        default="auto",
        choices=RUNTIMES,
        help="the sampling network's runtime: auto (OpenVINO on the CPU where installed, else torch), torch, openvino",
    )
    v.add_argument("--json", default=None, help="write the report here (default: next to nothing, print only)")
    v.set_defaults(func=cmd_eval)


def main(argv: list[str] | None = None) -> int:
    from ..cli import run_command

    args = build_parser().parse_args(argv)
    return run_command(args.func, args, debug=getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
