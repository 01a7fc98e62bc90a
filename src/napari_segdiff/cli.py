"""`napari-segdiff`: segment images from the shell.

    napari-segdiff segment IMAGE -o OUT.tif [--model nuclei-he] [--samples 5] [--steps 10] ...
    napari-segdiff segment big.zarr -o out.zarr --scheduler tcp://host:8786
    napari-segdiff models
    napari-segdiff eval --model nuclei-he --data DIR      (same as napari-segdiff-train eval)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from ._errors import SegDiffError
from .config import PRECISIONS


def cmd_segment(args) -> int:
    from tqdm import tqdm

    from .engine import Progress, iter_segment
    from .io import atomic_replace_dir, check_output, read_image, write_result

    inp = Path(args.input)
    out = check_output(args.output, [inp], args.overwrite)
    image = read_image(inp, lazy=True)
    client = None
    if args.scheduler:
        from distributed import Client

        client = Client(args.scheduler)
    kw = {k: getattr(args, k) for k in ("samples", "steps", "seed", "tile", "overlap", "batch_size", "threshold",
                                         "sampler") if getattr(args, k) is not None}
    if is_stack(image.shape):
        return _segment_stack_cli(args, image, inp, out, client, kw)
    stream = out.suffix.lower() == ".zarr"
    tmp = None
    if stream:  # big images: stream straight into a temp zarr store, renamed when complete
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        kw["out"] = str(tmp)
    bar = None
    try:
        result = None
        for item in iter_segment(image, args.model, device=args.device, client=client, precision=args.precision, **kw):
            if isinstance(item, Progress):
                if bar is None:
                    bar = tqdm(total=item.total, unit="tile", desc=inp.name, disable=args.quiet)
                bar.update(item.done - bar.n)
            else:
                result = item
        if bar is not None:
            bar.close()
        if stream:
            import zarr

            zarr.open_group(str(tmp), mode="a").attrs.update(
                {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in result.info.items()})
            check_output(out, [inp], args.overwrite)  # still free? (another process may have written it)
            atomic_replace_dir(tmp, out)
            tmp = None
        else:
            write_result(result, out, overwrite=args.overwrite, inputs=(inp,))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if client is not None:
            client.close()
    info = result.info
    print(f"wrote {out}: {info['tiles']} tiles, {info['samples']} samples x {info['steps']} steps, "
          f"model {info['model']}, {info['seconds']:.1f} s, foreground {float(result.mask[:].mean()):.3f}"
          if not stream else f"wrote {out}: {info['tiles']} tiles, model {info['model']}, {info['seconds']:.1f} s")
    return 0


def is_stack(shape: tuple[int, ...]) -> bool:
    """(Z, H, W) grey or (..., H, W, 3|4) colour stacks; a (3|4, H, W) array is read as channel-first colour."""
    if len(shape) >= 4:
        return True
    return len(shape) == 3 and shape[-1] not in (1, 3, 4) and shape[0] not in (1, 3, 4)


def _segment_stack_cli(args, image, inp, out, client, kw) -> int:
    from tqdm import tqdm

    from .engine import SegmentationResult
    from .io import write_result
    from .stacks import segment_stack

    if client is not None:
        raise SegDiffError("--scheduler works on 2-D images; run stacks without it (slices go one by one)")
    rgb = image.shape[-1] in (3, 4)
    gen = segment_stack(image, rgb, args.model, device=args.device, precision=args.precision, **kw)
    bar = None
    try:
        while True:
            p = next(gen)
            if bar is None:
                bar = tqdm(total=p.total, unit="tile", desc=inp.name, disable=args.quiet)
            bar.update(p.done - bar.n)
    except StopIteration as stop:
        res = stop.value
    finally:
        if bar is not None:
            bar.close()
    result = SegmentationResult(res.probability, res.variance, res.labels > 0, res.info)
    write_result(result, out, overwrite=args.overwrite, inputs=(inp,))
    print(f"wrote {out}: {res.info['slices']} slices, model {res.info['model']}, {res.info['seconds']:.1f} s")
    return 0


def cmd_models(args) -> int:
    from .models import DEFAULT_MODEL, list_models

    models = list_models()
    if not models:
        print("no shipped models installed")
    for name, desc in models.items():
        print(f"{name}{' (default)' if name == DEFAULT_MODEL else ''}: {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="napari-segdiff", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("segment", help="segment an image (tif/png/jpg/zarr) into a .tif or .zarr result")
    s.add_argument("input")
    s.add_argument("-o", "--output", required=True, help="result path: .tif (3 pages: probability, variance, "
                   "mask) or .zarr (group of three arrays, streamed: for images larger than memory)")
    s.add_argument("--model", default=None, help="shipped model name or model file (default: nuclei-he)")
    s.add_argument("--samples", type=int)
    s.add_argument("--steps", type=int)
    s.add_argument("--sampler", choices=["ddpm", "ddim"])
    s.add_argument("--seed", type=int)
    s.add_argument("--threshold", type=float)
    s.add_argument("--tile", type=int)
    s.add_argument("--overlap", type=float)
    s.add_argument("--batch-size", dest="batch_size", type=int)
    s.add_argument("--device", default="auto")
    s.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bfloat16 on a CPU with native bf16 (about x2 faster, same masks), else float32")
    s.add_argument("--scheduler", help="dask.distributed scheduler address: spread tiles over its workers")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output (never the input)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_segment)
    m = sub.add_parser("models", help="list shipped models")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "eval":
        from .training.cli import main as train_main

        return train_main(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SegDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
