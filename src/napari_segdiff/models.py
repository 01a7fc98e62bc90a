"""Model files: the shipped-model registry, safe loading (``weights_only=True``) and atomic saving.

A model file is a ``torch.save`` of plain containers and tensors only::

    {"format": "napari-segdiff-model", "version": 1, "config": {...NetworkConfig...},
     "state_dict": {...}, "meta": {...}}

so it loads with ``torch.load(weights_only=True)``: a pickle that tries to run code is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._errors import ModelFileError, SegDiffError
from .config import PRESETS, NetworkConfig, get_preset
from .diffusion import Diffusion
from .io import atomic_write_bytes
from .network import SegDiffNet

FORMAT = "napari-segdiff-model"
_STR_KEYS = ("time_embedding", "beta_schedule", "parameterization")  # config keys whose values are strings
WEIGHTS_DIR = Path(__file__).parent / "weights"
REGISTRY_FILE = WEIGHTS_DIR / "models.json"
#: the model ``segment(image)`` uses when none is named
DEFAULT_MODEL = "nuclei-he"


@dataclass
class SegDiffModel:
    """A network, its diffusion and where it came from."""

    net: SegDiffNet
    diffusion: Diffusion
    name: str = "untrained"
    sha256: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> NetworkConfig:
        return self.net.config

    @classmethod
    def from_config(cls, config: NetworkConfig | str, name: str | None = None, seed: int = 0) -> SegDiffModel:
        """A freshly initialised (untrained) model, e.g. for tests or training."""
        if isinstance(config, str):
            name = name or config
            config = get_preset(config)
        torch.manual_seed(seed)
        net = SegDiffNet(config).eval()
        return cls(net, Diffusion.from_config(config), name or "untrained")

    def to(self, device: torch.device | str) -> SegDiffModel:
        self.net.to(device)
        return self


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _registry() -> dict[str, dict[str, Any]]:
    if not REGISTRY_FILE.exists():
        return {}
    return json.loads(REGISTRY_FILE.read_text())


#: environment variable that overrides where user models (``napari-segdiff-train finetune --name``) live
USER_MODELS_ENV = "NAPARI_SEGDIFF_MODELS"


def user_models_dir() -> Path:
    """The per-user model directory: ``$NAPARI_SEGDIFF_MODELS``, else platformdirs' user data dir."""
    env = os.environ.get(USER_MODELS_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-segdiff")) / "models"


def _user_registry() -> dict[str, dict[str, Any]]:
    path = user_models_dir() / "models.json"
    if not path.exists():
        return {}
    try:
        reg = json.loads(path.read_text())
        if not isinstance(reg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as e:
        raise SegDiffError(
            f"the user model list {path} is unreadable ({e}); fix or delete it (the model files beside it are kept)"
        ) from None
    return reg


def list_models(user: bool = True) -> dict[str, str]:
    """Models by name, with a one-line description: the shipped ones, then the user's own (``finetune --name``)."""
    out = {name: entry.get("description", "") for name, entry in _registry().items()}
    if user:
        for name, entry in _user_registry().items():
            out.setdefault(name, f"{entry.get('description', '')} (user model)".strip())
    return out


def register_user_model(
    name: str, path: str | os.PathLike, sha256: str, description: str = "", overwrite: bool = False
) -> Path:
    """Copy a model file into the user model directory under ``name``; it then works by name everywhere."""
    import shutil

    if not name or any(c in name for c in '/\\:*?"<>|') or name.startswith("."):
        raise SegDiffError(f"model name {name!r} must be a plain name (letters, digits, - and _)")
    if name in _registry():
        raise SegDiffError(f"{name!r} is a shipped model's name; choose another name")
    reg = _user_registry()
    if name in reg and not overwrite:
        raise SegDiffError(
            f"a user model named {name!r} exists already ({user_models_dir() / reg[name]['file']}); "
            "choose another name or pass --overwrite"
        )
    folder = user_models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / f"{name}.pt"
    if Path(path).resolve() != dst.resolve():

        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f)

        atomic_write_bytes(dst, copy)
    reg[name] = {"file": dst.name, "sha256": sha256, "description": description}
    atomic_write_bytes(folder / "models.json", lambda f: f.write((json.dumps(reg, indent=2) + "\n").encode()))
    return dst


def register_model(name: str, path: str | os.PathLike, sha256: str, description: str = "") -> None:
    """Add or replace a shipped model in the registry (the file must lie in the weights folder)."""
    path = Path(path).resolve()
    if path.parent != WEIGHTS_DIR.resolve():
        raise SegDiffError(f"shipped models live in {WEIGHTS_DIR}; {path} is elsewhere")
    reg = _registry()
    reg[name] = {"file": path.name, "sha256": sha256, "description": description}
    atomic_write_bytes(REGISTRY_FILE, lambda f: f.write((json.dumps(reg, indent=2) + "\n").encode()))


def _payload(net: SegDiffNet, half: bool, meta: dict[str, Any] | None) -> dict[str, Any]:
    """The model file's content: format header, architecture, weights (fp16 floats when ``half``), metadata."""
    state = {}
    for k, v in net.state_dict().items():
        v = v.detach().cpu()
        state[k] = v.half() if half and v.is_floating_point() else v.clone()
    return {
        "format": FORMAT,
        "version": 1,
        "config": net.config.to_dict(),
        "state_dict": state,
        "meta": dict(meta or {}),
    }


def save_model(
    model: SegDiffModel | SegDiffNet, path: str | os.PathLike, *, half: bool = True, meta: dict[str, Any] | None = None
) -> str:
    """Write an inference file atomically (fp16 floats by default); returns its sha256."""
    net = model.net if isinstance(model, SegDiffModel) else model
    payload = _payload(net, half, meta)
    atomic_write_bytes(path, lambda f: torch.save(payload, f))
    return sha256_of(path)


def to_bytes(model: SegDiffModel) -> bytes:
    """The model as the bytes of a model file (full precision; name and sha256 in its metadata), e.g. to send
    to other processes; :func:`from_bytes` reads it back."""
    buf = io.BytesIO()
    torch.save(_payload(model.net, False, {"name": model.name, "sha256": model.sha256}), buf)
    return buf.getvalue()


def from_bytes(data: bytes, device: str | torch.device = "cpu") -> SegDiffModel:
    """A model from :func:`to_bytes` output, checked like a model file."""
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    meta = payload.get("meta", {}) if isinstance(payload, dict) else {}
    return _from_payload(payload, "model bytes", meta.get("sha256"), meta.get("name"), device)


def _describe_mismatch(cfg: NetworkConfig) -> str:
    for name, preset in PRESETS.items():
        if preset == cfg:
            return f"preset {name!r}"
    return "a custom configuration"


def _match_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Name the preset whose parameter shapes a bare state_dict has (built on the meta device: no memory)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            ref = SegDiffNet(cfg).state_dict()
        if {k: tuple(v.shape) for k, v in ref.items()} == shapes:
            return f"made for preset {name!r}"
    return "of no known preset"


def load_model_file(
    path: str | os.PathLike,
    *,
    expected_sha256: str | None = None,
    name: str | None = None,
    device: str | torch.device = "cpu",
) -> SegDiffModel:
    path = Path(path)
    if not path.exists():
        raise ModelFileError(
            f"model file {str(path)!r} does not exist; give a shipped model name "
            f"({', '.join(list_models()) or 'none installed'}) or the path of a .pt file "
            "written by `napari-segdiff-train export`"
        )
    digest = sha256_of(path)
    if expected_sha256 and digest != expected_sha256:
        raise ModelFileError(
            f"model file {str(path)!r} has sha256 {digest}, expected {expected_sha256}: the file "
            "is corrupted or was replaced; reinstall napari-segdiff to restore it"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, code-running pickle...
        raise ModelFileError(
            f"cannot read model file {str(path)!r}: it is not a valid napari-segdiff model "
            f"file (truncated, corrupted, or not made by napari-segdiff): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if isinstance(payload, dict) and "model" in payload and "format" not in payload:
        raise ModelFileError(
            f"{str(path)!r} is a training checkpoint, not a model file; turn it into one with "
            "`napari-segdiff-train export RUN_DIR --name NAME`"
        )
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        match = _match_state_dict(payload)
        raise ModelFileError(
            f"{str(path)!r} is a bare state_dict ({match}), not a napari-segdiff model file "
            "with its architecture embedded; save it with napari_segdiff.models.save_model(net, path)"
        )
    return _from_payload(payload, path, digest, name or None, device)


def _from_payload(payload, path, digest: str | None, name: str | None, device) -> SegDiffModel:
    """Build the model of a loaded model file (``path`` only names it in messages)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{str(path)!r} is not a napari-segdiff model file (no {FORMAT!r} header)")
    try:
        cfg = NetworkConfig.from_dict(payload["config"])
    except SegDiffError as e:
        raise ModelFileError(f"model file {str(path)!r} has an invalid config: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a value of the wrong type, a missing key
        bad = [k for k, v in (payload.get("config") or {}).items() if isinstance(v, str) and k not in _STR_KEYS]
        raise ModelFileError(
            f"model file {str(path)!r} has an invalid config"
            + (f" (wrongly typed: {', '.join(bad)})" if bad else "")
            + f": {type(e).__name__}: {e}"
        ) from None
    net = SegDiffNet(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError:  # shape mismatches
        missing, unexpected = ["(shape mismatch)"], []
    if missing or unexpected:
        raise ModelFileError(
            f"model file {str(path)!r} does not match its embedded architecture "
            f"({_describe_mismatch(cfg)}; the weights are {_match_state_dict(state)}): "
            f"{len(missing)} missing and {len(unexpected)} "
            f"unexpected weights, e.g. {(missing or unexpected)[:3]}"
        )
    net.eval().to(device)
    meta = dict(payload.get("meta", {}))
    return SegDiffModel(net, Diffusion.from_config(cfg), name or meta.get("name") or Path(path).stem, digest, meta)


def _with_registry_facts(mdl: SegDiffModel, reg: dict, name: str | None = None) -> SegDiffModel:
    """Facts measured after a file was made (native pixel size, sampling, instance split) live in the registry,
    so the checksummed weights file stays as it was shipped; they apply to the file by its name and to any copy
    of it (the same sha256) loaded by path."""
    for key, entry in reg.items():
        if key == name or (entry.get("sha256") and entry["sha256"] == mdl.sha256):
            mdl.meta.update(entry.get("meta", {}))
    return mdl


def _resolve(model: str | os.PathLike | None) -> tuple[Path, str | None, str | None, dict, str | None]:
    """(file, expected sha256, name, registry, registry name) of a model name or path; unknown names refused."""
    if model is None:
        model = DEFAULT_MODEL
    reg = _registry()
    key = str(model)
    if key in reg:
        return WEIGHTS_DIR / reg[key]["file"], reg[key].get("sha256"), key, reg, key
    user = _user_registry()
    if key in user:
        return user_models_dir() / user[key]["file"], user[key].get("sha256"), key, {}, None
    if Path(key).suffix or os.sep in key or Path(key).exists():
        return Path(key), None, None, reg, None
    raise ModelFileError(
        f"unknown model {key!r}; shipped models: {sorted(reg) or 'none installed'}"
        + (f", user models: {sorted(user)}" if user else "")
        + ", or give the path of a model file"
    )


def load_model(
    model: str | os.PathLike | SegDiffModel | None = None, device: str | torch.device = "cpu"
) -> SegDiffModel:
    """A shipped model by name (checksum verified), a model file path, or a model passed through."""
    if isinstance(model, SegDiffModel):
        return model.to(device)
    return _load(_resolve(model), device)


def _load(resolved: tuple, device) -> SegDiffModel:
    """The model of a ``_resolve`` answer: its file read and checked, with the registry's facts."""
    path, sha, name, reg, reg_name = resolved
    mdl = load_model_file(path, expected_sha256=sha, name=name, device=device)
    return _with_registry_facts(mdl, reg, reg_name) if reg else mdl


#: models loaded by ``shared_model``, most recent last, by name, file, size, mtime, checksum, registry, device
_SHARED: OrderedDict[tuple, SegDiffModel] = OrderedDict()
_SHARED_LOCK = threading.Lock()
SHARED_MODELS = 2


def shared_model(
    model: str | os.PathLike | SegDiffModel | None = None, device: str | torch.device = "cpu"
) -> SegDiffModel:
    """``load_model`` for callers that only read the model (``segment()``): a model named or given by path is
    loaded once and kept (the last ``SHARED_MODELS``), so a script that segments image after image by name reads,
    checks and builds it once. Kept per file, size, modification time, expected checksum and registry entries: a
    file replaced on disk (a user model registered again) is loaded afresh. Never modify the returned model;
    ``load_model`` gives a private copy."""
    if isinstance(model, SegDiffModel):
        return model.to(device)
    resolved = _resolve(model)
    path, sha, _, reg, _ = resolved
    try:
        st = path.stat()
    except OSError:  # load_model_file says what is wrong with the path
        return _load(resolved, device)
    facts = json.dumps(reg, sort_keys=True, default=str)  # the registry's facts apply at load time
    key = (str(model), str(path.resolve()), st.st_size, st.st_mtime_ns, sha, facts, str(torch.device(device)))
    with _SHARED_LOCK:
        if key in _SHARED:
            _SHARED.move_to_end(key)
            return _SHARED[key]
    mdl = _load(resolved, device)
    with _SHARED_LOCK:
        _SHARED[key] = mdl
        while len(_SHARED) > SHARED_MODELS:
            _SHARED.popitem(last=False)
    return mdl
