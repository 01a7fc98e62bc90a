"""OpenVINO as a second runtime for the sampling network on the CPU (the optional ``openvino`` extra).

The engine's unit of work is one batched call of the denoiser D(E(F(x_t) + G(I), t), t) and, once per tile,
of the image encoder G(I). Both are converted from the model's torch modules (``openvino.convert_model``,
dynamic batch and spatial size), saved as OpenVINO IR in a per-user cache keyed by the weights, the network
code and the library versions, and compiled for the CPU with the run's precision (``bf16`` -> OpenVINO's
bf16 inference hint, ``fp32`` -> f32). The first run of a model on a machine pays the conversion (about 16 s
for nuclei-he on a 2-core Xeon); later runs read the IR (well under a second).

Measured (``benchmarks/run.py --only runtimes``; Intel Xeon, 2 cores, AMX-BF16; 6 x 256^2 nuclei-he forward):
torch channels-last bf16 0.75 s, OpenVINO bf16 0.39 s; largest output difference against torch fp32 0.026
(torch's own bf16: 0.028).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ._errors import SegDiffError

#: environment variable that overrides where converted networks are cached
CACHE_ENV = "NAPARI_SEGDIFF_CACHE"
#: bumped when what is converted (the wrappers below, their inputs) changes
FORMAT = 1
INSTALL_HINT = "install it with: pip install 'napari-segdiff[openvino]' (or: pip install openvino)"

_COMPILED: OrderedDict = OrderedDict()  # (ir key, precision, threads) -> (encoder, denoiser), per process
_LOCK = threading.Lock()
#: conversions done by this process (tests read it to see the cache at work)
conversions = 0
#: converted models kept on disk; the least recently used beyond this are removed
KEEP = 8


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except Exception:  # an install broken in any way counts as absent for 'auto'
        return False
    return True


def version() -> str | None:
    try:
        import openvino as ov
    except Exception:
        return None
    return ov.__version__.split("-")[0]


def require() -> None:
    if not available():
        raise SegDiffError(
            f"runtime 'openvino' was asked for but the openvino package is not installed; {INSTALL_HINT}"
        )


def cache_dir() -> Path:
    """``$NAPARI_SEGDIFF_CACHE``, else platformdirs' user cache dir, with ``openvino/`` under it."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser() / "openvino"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-segdiff")) / "openvino"


class _Encoder(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image):
        return self.net.encode_image(image)


class Denoiser(torch.nn.Module):
    """The sampling network as the engine calls it per step: (x_t, t, G(I) features) -> output (also what the
    benchmarks export to ONNX)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, feats):
        return self.net(x, t, features=feats)


#: each network's key, remembered while it lives and its tensors are unchanged (hashing the weights costs
#: about 15 ms of every segment() of nuclei-he)
_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _local(net: torch.nn.Module, local: bool | None) -> bool:
    return bool(getattr(net, "local_attention", False) if local is None else local)


def ir_key(net: torch.nn.Module, local: bool | None = None) -> str:
    """What the converted files depend on: weights, network config and code, local attention (default: the
    network's own setting), torch and OpenVINO versions."""
    local = _local(net, local)
    state = net.state_dict()
    stamp = (local, tuple((n, t.data_ptr(), t._version, t.dtype) for n, t in state.items()))
    known = _KEYS.get(net)
    if known is not None and known[0] == stamp:
        return known[1]
    from . import network

    h = hashlib.sha256()
    h.update(f"{FORMAT}|{torch.__version__}|{version()}|{net.config!r}|local={local}".encode())
    h.update(inspect.getsource(network).encode())
    for name, tensor in state.items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    key = h.hexdigest()[:24]
    _KEYS[net] = (stamp, key)
    return key


def _convert(net: torch.nn.Module, dest: Path, local: bool = False) -> None:
    """Convert encoder and denoiser into ``dest`` (written into a temp folder, then renamed), with attention
    by blocks of a training crop where ``local``."""
    import openvino as ov

    global conversions
    cfg = net.config
    # a small example (the shapes stay dynamic); with local attention one of two crops a side, so that the
    # traced graph holds the attention by blocks (it serves tiles whose sides are multiples of the crop)
    side = 2 * cfg.image_size if local else 4 * cfg.downsample_factor
    c = cfg.base_channels
    img = torch.zeros(1, cfg.in_channels, side, side)
    x = torch.zeros(1, cfg.mask_channels, side, side)
    t = torch.zeros(1, dtype=torch.long)
    feats = torch.zeros(1, c, side, side)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        net = copy.deepcopy(net).float().eval().to(memory_format=torch.contiguous_format)
        if hasattr(net, "set_local_attention"):
            net.set_local_attention(local)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python-int shapes: the graph keeps them dynamic
            enc = ov.convert_model(
                _Encoder(net), example_input=(img,), input=[ov.PartialShape([-1, cfg.in_channels, -1, -1])]
            )
            den = ov.convert_model(
                Denoiser(net),
                example_input=(x, t, feats),
                input=[
                    ov.PartialShape([-1, cfg.mask_channels, -1, -1]),
                    ov.PartialShape([-1]),
                    ov.PartialShape([-1, c, -1, -1]),
                ],
            )
        ov.save_model(enc, str(tmp / "encoder.xml"), compress_to_fp16=False)
        ov.save_model(den, str(tmp / "denoiser.xml"), compress_to_fp16=False)
        conversions += 1
        try:
            os.replace(tmp, dest)  # atomic; another process that got there first wins
        except OSError:
            if not (dest / "denoiser.xml").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compiled(net: torch.nn.Module, precision: str, threads: int, local: bool | None = None):
    """(encoder, denoiser) compiled models for ``net`` (with local attention where ``local``; default: the
    network's own setting), converting it once per machine."""
    import openvino as ov

    local = _local(net, local)
    key = ir_key(net, local)
    ck = (key, precision, threads)
    with _LOCK:
        if ck in _COMPILED:
            _COMPILED.move_to_end(ck)
            return _COMPILED[ck]
        dest = cache_dir() / key
        if not (dest / "denoiser.xml").exists() or not (dest / "encoder.xml").exists():
            if dest.exists():
                shutil.rmtree(dest, ignore_errors=True)  # a partial folder of an older layout
            try:
                _convert(net, dest, local)
            except OSError as e:
                raise SegDiffError(
                    f"could not write the OpenVINO cache in {dest.parent} ({e}); set {CACHE_ENV} to a writable "
                    "folder, or use runtime 'torch'"
                ) from e
        _touch_and_prune(dest)
        core = ov.Core()
        props = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "INFERENCE_NUM_THREADS": threads}
        pair = tuple(
            core.compile_model(core.read_model(str(dest / f"{part}.xml")), "CPU", props)
            for part in ("encoder", "denoiser")
        )
        _COMPILED[ck] = pair
        while len(_COMPILED) > 4:
            _COMPILED.popitem(last=False)
        return pair


def _touch_and_prune(dest: Path) -> None:
    """Mark ``dest`` as just used and remove all but the :data:`KEEP` most recently used conversions."""
    try:
        os.utime(dest)
        entries = sorted(
            (p for p in dest.parent.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in entries[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError:  # a cache another process is pruning too: nothing lost but disk
        pass


def _array(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32 if x.is_floating_point() else x.dtype).numpy())


class OpenVINONet:
    """The two calls the engine makes of a :class:`~napari_segdiff.network.SegDiffNet`, run by OpenVINO:
    ``encode_image(image)`` and ``net(x_t, t, features=...)``, torch tensors in and out (float32).

    A network with local attention is converted as it is, for tiles whose sides are multiples of its crop
    (``image_size``), and, only when a tile of another size comes, also with global attention: what the torch
    network does with such a tile."""

    def __init__(
        self, net: torch.nn.Module, precision: str = "fp32", threads: int | None = None, local: bool | None = None
    ):
        require()
        self.precision = precision
        self.threads = int(threads or torch.get_num_threads())
        self._net = net
        local = _local(net, local)
        self._crop = net.config.image_size if local else 0
        enc, den = compiled(net, precision, self.threads, local)
        self._enc, self._den = enc.create_infer_request(), den.create_infer_request()
        self._den_global = None

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        out = self._enc.infer([_array(image)])
        return torch.from_numpy(np.asarray(out[0]))

    def _denoiser(self, h: int, w: int):
        if not self._crop or (h % self._crop == 0 and w % self._crop == 0):
            return self._den
        if self._den_global is None:
            self._den_global = compiled(self._net, self.precision, self.threads, False)[1].create_infer_request()
        return self._den_global

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        den = self._denoiser(*x_t.shape[-2:])
        out = den.infer([_array(x_t), _array(t.long()), _array(features)])
        return torch.from_numpy(np.asarray(out[0]))
