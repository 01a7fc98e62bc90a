"""`napari-segdiff`: segment images from the shell.

napari-segdiff segment IMAGE -o OUT.tif [--model nuclei-he] [--samples 5] [--steps 10] ...
napari-segdiff segment images/ -o results/ --table results/objects.csv   (every image of a folder, one table)
napari-segdiff segment big.zarr -o out.zarr --scheduler tcp://host:8786
napari-segdiff models
napari-segdiff eval --model nuclei-he --data DIR      (same as napari-segdiff-train eval)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

from ._errors import SegDiffError
from .config import SamplingConfig, SegmentConfig, TilingConfig, add_arguments
from .objects import result_table, write_csv


def cmd_segment(args) -> int:
    jobs, batch, batch_table = plan_segment(args)
    if not batch:
        return _segment_file(args, *jobs[0])
    return _segment_batch(args, jobs, batch_table)


#: what an output (or --table) name may hold to give each input its own: the input's name without, and with,
#: its extension
NAME_KEYS = ("{stem}", "{name}")


def _templated(template: str) -> bool:
    return any(k in template for k in NAME_KEYS)


def _fill(template: str, inp: Path) -> Path:
    return Path(template.replace("{stem}", inp.stem).replace("{name}", inp.name))


def expand_inputs(paths: list[str]) -> list[Path]:
    """The images named on the command line; a folder (other than a zarr store or array) stands for the image
    files in it, sorted by name (hidden files left out)."""
    from .io import READ_EXT, is_zarr

    files: list[Path] = []
    for s in paths:
        p = Path(s)
        if p.is_dir() and not is_zarr(p):
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in READ_EXT and not q.name.startswith("."))
            if not found:
                raise SegDiffError(
                    f"folder {s!r} holds no images ({', '.join(sorted(READ_EXT))}); name image files or a folder "
                    "of them"
                )
            files += found
        else:
            files.append(p)
    return files


def plan_segment(args) -> tuple[list[tuple[Path, Path, Path | None]], bool, Path | None]:
    """(input, output, table) for each image, whether it is a batch, and the batch's one table; every output
    checked before any work (never an input, an existing one only with --overwrite; asking for a table of
    objects turns --instances on). One input and a plain -o is the single-image command; several inputs, a
    folder, or an -o with {stem}/{name} is a batch, whose -o is a folder (results named after the inputs,
    .tif) or a name pattern, e.g. 'out/{stem}.zarr', and whose --table is one table for every image (an
    ``image`` column first) or, with {stem}/{name}, one per image."""
    from .io import WRITE_EXT, check_file_output, check_output

    inputs = expand_inputs(args.input)
    batch = len(args.input) > 1 or len(inputs) > 1 or inputs[0] != Path(args.input[0]) or _templated(args.output)
    batch_table = None
    if not batch:
        outs, tables = [Path(args.output)], [Path(args.table) if args.table else None]
    else:
        if _templated(args.output):
            outs = [_fill(args.output, inp) for inp in inputs]
        elif Path(args.output).suffix.lower() in WRITE_EXT:
            raise SegDiffError(
                f"{len(inputs)} images cannot all be written to {args.output!r}; give an output folder (-o "
                "results/) or a name with {stem} in it (-o 'results/{stem}.tif')"
            )
        else:
            outs = [Path(args.output) / f"{inp.stem}.tif" for inp in inputs]
        if args.table and not _templated(args.table):
            batch_table = Path(args.table)
        tables = [_fill(args.table, inp) if args.table and not batch_table else None for inp in inputs]
    if args.table:
        args.instances = True
    seen: dict[Path, Path] = {}
    if batch_table is not None:
        check_file_output(batch_table, inputs, args.overwrite, (".csv",))
    for inp, out, table in zip(inputs, outs, tables):
        for o in (out, table):
            if o is None:
                continue
            if o.resolve() in seen:
                raise SegDiffError(
                    f"{seen[o.resolve()].name} and {inp.name} would both be written to {str(o)!r}; use {{name}} "
                    "instead of {stem} in the output name, or segment them separately"
                )
            seen[o.resolve()] = inp
        check_output(out, inputs, args.overwrite)
        if table is not None:
            check_file_output(table, inputs, args.overwrite, (".csv",))  # -o is never a .csv
    return list(zip(inputs, outs, tables)), batch, batch_table


def _segment_batch(args, jobs, batch_table: Path | None = None) -> int:
    """Each image in turn with one model (loaded once); an image that fails is reported (as any command's error,
    named) and the rest go on. Exit 0 when every image was written, 2 when some were refused as bad input, 1
    when one failed otherwise; an interrupt stops the batch. The batch's table holds the objects of every
    image whose result was written, also when the batch stopped early."""
    failed: list[tuple[Path, int]] = []
    rows: list[tuple[str, dict]] | None = [] if batch_table is not None else None
    rc = 0
    try:
        for i, (inp, out, table) in enumerate(jobs):
            job = functools.partial(_segment_file, inp=inp, out=out, table=table, collect=rows)
            rc = run_command(job, args, debug=args.debug, label=f"{inp}: ")
            if rc in (130, 143):
                print(
                    f"the {i - len(failed)} results written before {inp.name} are complete; the "
                    f"{len(jobs) - i - 1} images after it were not started",
                    file=sys.stderr,
                )
                return rc
            if rc:
                failed.append((inp, rc))
    finally:
        if rows:
            write_csv(batch_table, rows)
            print(
                f"{sum(len(t['label']) for _, t in rows)} objects of {len(rows)} images in {batch_table}",
                file=sys.stderr if rc in (130, 143) else sys.stdout,
            )
    print(
        f"segmented {len(jobs) - len(failed)} of {len(jobs)} images"
        + (f"; not written: {', '.join(str(f) for f, _ in failed)}" if failed else "")
    )
    codes = {code for _, code in failed}
    return 1 if 1 in codes else 2 if codes else 0


def _segment_file(args, inp: Path, out: Path, table: Path | None, collect: list | None = None) -> int:
    try:
        return _cmd_segment(args, inp, out, table, collect)
    except Exception as e:  # data that fails while its tiles are read (lazily): say which file and what
        if type(e).__module__.split(".")[0] in ("tifffile", "zarr", "numcodecs", "PIL", "imagecodecs"):
            raise SegDiffError(
                f"cannot read {str(inp)!r} while segmenting it: {type(e).__name__}: {e}; the file is "
                "truncated or corrupt (check it opens in another program, or export it again)"
            ) from None
        raise


def _cmd_segment(args, inp: Path, out: Path, table: Path | None, collect: list | None = None) -> int:
    """Segment one image into ``out``; its objects go to ``table`` and, for a batch's one table, are appended
    to ``collect`` as (input, rows) once the result is written."""
    from tqdm import tqdm

    from .engine import Progress, SegmentationResult, drain, iter_segment
    from .io import atomic_replace_dir, check_output, read_image, read_image_meta, write_result

    image = read_image(inp, lazy=True, series=args.series)
    check_channels(image.shape, inp)
    meta = read_image_meta(inp)
    geojson = out.suffix.lower() == ".geojson"
    if geojson:
        from .io import labels_to_geojson

        labels_to_geojson(np.zeros((1, 1), np.int32), meta)  # refuses a non-georeferenced input now, not after
        args.instances = True
    client = None
    if args.scheduler:
        from distributed import Client

        client = Client(args.scheduler)
    kw = {
        k: getattr(args, k)
        for k in (
            "samples",
            "steps",
            "seed",
            "tile",
            "overlap",
            "batch_size",
            "threshold",
            "object_threshold",
            "sampler",
            "eta",
            "tta",
            "skip_empty",
            "colour_match",
        )
        if getattr(args, k) is not None
    }
    kw.update(_pixel_size_args(args, meta, inp))
    if args.instances:
        kw["instances"] = True
    if is_stack(image.shape):
        return _segment_stack_cli(args, image, inp, out, client, kw, table, collect)
    if geojson and is_stack(image.shape):
        raise SegDiffError("GeoJSON output works on 2-D images; write a stack to .tif or .zarr")
    stream = out.suffix.lower() == ".zarr"
    tmp = None
    if stream:  # big images: stream straight into a temp zarr store, renamed when complete
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        kw["out"], kw["overwrite"] = str(tmp), True  # the run's own fresh temp store
    bar = None

    def show(p: Progress) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=p.total, unit="tile", desc=inp.name, disable=args.quiet)
        bar.update(p.done - bar.n)

    try:
        items = iter_segment(
            image, args.model, device=args.device, client=client, precision=args.precision, runtime=args.runtime, **kw
        )
        result = drain(items, SegmentationResult, on_progress=show)
        if bar is not None:
            bar.close()
        # measured now: a streamed result's arrays live in the temp store until it is renamed
        rows = result_table(result) if table is not None or collect is not None else None
        if stream:
            import zarr

            zarr.open_group(str(tmp), mode="a").attrs.update(
                {
                    k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                    for k, v in result.info.items()
                }
            )
            check_output(out, [inp], args.overwrite)  # still free? (another process may have written it)
            atomic_replace_dir(tmp, out)
            tmp = None
        else:
            write_result(result, out, overwrite=args.overwrite, inputs=(inp,), meta=meta)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if client is not None:
            client.close()
    info = result.info
    extra = f", {info['objects']} objects" if "objects" in info else ""
    extra += _publish_rows(rows, inp, table, collect)
    if "pixel_size" in info:
        extra += (
            f", pixel size {info['pixel_size']:g} {info['pixel_unit']} (model {info['model_pixel_size']:g} "
            f"{info['model_pixel_unit']})"
        )
    print(
        f"wrote {out}: {info['tiles']} tiles, {info['samples']} samples x {info['steps']} steps, "
        f"model {info['model']}, {info.get('runtime', 'torch')} {info['precision']}, {info['seconds']:.1f} s, "
        f"foreground {float(np.asarray(result.mask[:]).mean()):.3f}"
        f"{extra}"
    )
    return 0


def check_channels(shape: tuple[int, ...], inp: Path) -> None:
    """A 2-D file must be grey (H, W), or colour (H, W, 1|3|4) / (1|3|4, H, W); (H, W, 2) and (H, W, 5+)
    are refused as segment() refuses them (a stack of H slices of W x 2 pixels is never what was meant)."""
    if len(shape) == 3 and (shape[-1] == 2 or (5 <= shape[-1] <= 16 and shape[0] > 16)):
        raise SegDiffError(
            f"{inp.name} has {shape[-1]} channels (shape {tuple(shape)}); napari-segdiff reads grey, "
            "grey+alpha, RGB or RGBA images: save it as one of those"
        )


def _pixel_size_args(args, meta, inp: Path) -> dict:
    """--pixel-size, else what the file records (OME, ImageJ, GeoTIFF or resolution tags); the file's value is
    used only when the model records its own pixel size and the two are within the accepted range."""
    if args.pixel_size is not None:
        return {"pixel_size": args.pixel_size, "pixel_unit": args.pixel_unit}
    if args.pixel_unit is not None:
        raise SegDiffError("--pixel-unit needs --pixel-size")
    if meta.pixel_size is None or args.ignore_pixel_size:
        return {}
    from .models import load_model
    from .pixelsize import scale_factor

    mdl = load_model(args.model)
    try:
        scale_factor(meta.pixel_size, meta.pixel_unit, mdl.meta, mdl.name)
    except SegDiffError as e:
        print(
            f"note: {inp.name} records a pixel size of {meta.pixel_size:g} {meta.pixel_unit} ({meta.source}), "
            f"not used: {e}",
            file=sys.stderr,
        )
        return {}
    if not args.quiet:
        print(
            f"pixel size {meta.pixel_size:g} {meta.pixel_unit} (from the file's {meta.source} metadata; "
            f"--pixel-size overrides, --ignore-pixel-size turns it off)",
            file=sys.stderr,
        )
    return {"pixel_size": meta.pixel_size, "pixel_unit": meta.pixel_unit}


def is_stack(shape: tuple[int, ...]) -> bool:
    """(Z, H, W) grey or (..., H, W, 3|4) colour stacks; a (3|4, H, W) array is read as channel-first colour."""
    if len(shape) >= 4:
        return True
    return len(shape) == 3 and shape[-1] not in (1, 3, 4) and shape[0] not in (1, 3, 4)


def _publish_rows(rows, inp: Path, table: Path | None, collect: list | None) -> str:
    """An image's object rows, once its result is written: to its own ``table``, or handed to the batch's one
    table (``collect``); returns what the summary line says of it."""
    if collect is not None:
        collect.append((str(inp), rows))
    if table is None:
        return ""
    write_csv(table, rows)
    return f" (one row each in {table})"


def _segment_stack_cli(args, image, inp, out, client, kw, table: Path | None = None, collect=None) -> int:
    from tqdm import tqdm

    from .engine import SegmentationResult, drain
    from .io import write_result
    from .stacks import StackResult, iter_segment_stack

    if client is not None:
        raise SegDiffError("--scheduler works on 2-D images; run stacks without it (slices go one by one)")
    rgb = image.shape[-1] in (3, 4)
    gen = iter_segment_stack(
        image,
        rgb,
        args.model,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        **{k: v for k, v in kw.items() if k != "instances"},
        instances=bool(kw.get("instances")),
    )
    bar = None

    def show(p):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=p.total, unit="tile", desc=inp.name, disable=args.quiet)
        bar.update(p.done - bar.n)

    try:
        res = drain(gen, StackResult, on_progress=show)
    finally:
        if bar is not None:
            bar.close()
    result = SegmentationResult(res.probability, res.variance, res.mask, res.info, res.labels)
    write_result(result, out, overwrite=args.overwrite, inputs=(inp,))
    extra = f", {res.info['objects']} objects" if "objects" in res.info else ""
    rows = result_table(result) if table is not None or collect is not None else None
    extra += _publish_rows(rows, inp, table, collect)
    print(f"wrote {out}: {res.info['slices']} slices, model {res.info['model']}, {res.info['seconds']:.1f} s{extra}")
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
    p = argparse.ArgumentParser(
        prog="napari-segdiff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser(
        "segment", help="segment images (tif/png/jpg/zarr, or folders of them) into .tif, .zarr or .geojson results"
    )
    s.add_argument(
        "input",
        nargs="+",
        help="image file(s) or folder(s) of images; several are segmented one after another with the model loaded once",
    )
    s.add_argument(
        "-o",
        "--output",
        required=True,
        help="result path: .tif (pages: probability, variance, "
        "mask, and labels with --instances; a GeoTIFF input's georeferencing is kept), .zarr (a group of "
        "those arrays, streamed: for images larger than memory) or .geojson (one polygon per object, "
        "in a GeoTIFF input's map coordinates). For several images: a folder (results/: one STEM.tif each) "
        "or a name with {stem} or {name} in it ('results/{stem}.zarr')",
    )
    s.add_argument("--model", default=None, help="shipped model name or model file (default: nuclei-he)")
    add_arguments(s, SamplingConfig, ("samples", "steps", "sampler", "eta", "tta"))
    s.add_argument(
        "--pixel-size",
        dest="pixel_size",
        type=float,
        help="the image's pixel size (default: what the file records, else the model's own)",
    )
    s.add_argument("--pixel-unit", dest="pixel_unit", help="unit of --pixel-size (default: the model's: um or m)")
    s.add_argument(
        "--ignore-pixel-size",
        dest="ignore_pixel_size",
        action="store_true",
        help="do not use the pixel size the file records",
    )
    s.add_argument("--instances", action="store_true", help="also write instance labels (one id per object)")
    s.add_argument(
        "--table",
        metavar="FILE.csv",
        help="also write one row per object: area, centroid, axes, eccentricity, mean probability and mean "
        "variance (the model's uncertainty about the object); physical units with a known pixel size. "
        "Turns --instances on. For several images: one table with the image's path in its first column, or "
        "one per image with {stem} in the name ('results/{stem}.csv')",
    )
    s.add_argument("--series", type=int, default=None, help="which image series of a multi-series TIFF (default 0)")
    add_arguments(s, SamplingConfig, ("seed", "threshold", "object_threshold"))
    add_arguments(s, TilingConfig)
    add_arguments(s, SegmentConfig, model_defaults=False)
    s.add_argument("--scheduler", help="dask.distributed scheduler address: spread tiles over its workers")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output (never the input)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    s.set_defaults(func=cmd_segment)
    from .training.cli import add_eval_parser

    add_eval_parser(sub)
    m = sub.add_parser("models", help="list shipped and user models")
    m.set_defaults(func=cmd_models)
    return p


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that temp outputs are removed on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_command(func, args, debug: bool = False, label: str = "") -> int:
    """Every CLI command's error handling: one ``error:`` line (exit 2 for bad input or usage, 1 for a run that
    failed unexpectedly; the traceback only with --debug), 130 on Ctrl-C and 143 on SIGTERM, temp files gone.
    ``label`` starts the error line (a batch names the image)."""
    old = None
    with contextlib.suppress(ValueError):  # not the main thread
        old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return func(args)
    except SegDiffError as e:
        if debug:
            raise
        print(f"error: {label}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {label}no output was written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"terminated: {label}no output was written", file=sys.stderr)
        return 143
    except Exception as e:
        if debug:
            raise
        print(f"error: {label}{type(e).__name__}: {e} (run again with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser().parse_args(argv)
    return run_command(args.func, args, debug=getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
