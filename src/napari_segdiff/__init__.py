"""napari-segdiff: diffusion-model segmentation (SegDiff, Amit et al.) for napari and scripts.

>>> import napari_segdiff
>>> result = napari_segdiff.segment(image)            # shipped default model
>>> result.probability, result.variance, result.mask
>>> result = napari_segdiff.segment(image, instances=True)
>>> result.labels, result.objects()                   # one id per object; one table row per object
"""

from ._errors import ModelFileError, SegDiffError
from .config import PRESETS, NetworkConfig, SamplingConfig, SegmentConfig, TilingConfig, get_preset
from .engine import Progress, SegmentationResult, available_devices, iter_segment, recommended_config, segment
from .models import DEFAULT_MODEL, SegDiffModel, list_models, load_model
from .objects import object_table

__version__ = "0.1.0"

__all__ = [
    "segment",
    "iter_segment",
    "object_table",
    "load_model",
    "list_models",
    "DEFAULT_MODEL",
    "SegDiffModel",
    "NetworkConfig",
    "SamplingConfig",
    "TilingConfig",
    "SegmentConfig",
    "PRESETS",
    "get_preset",
    "Progress",
    "SegmentationResult",
    "available_devices",
    "recommended_config",
    "SegDiffError",
    "ModelFileError",
]
