"""What the model's image processor asks of the decoders, read from the Hugging Face processor itself.

``load_preprocess(model_dir)`` loads the model's processor with transformers (so every config
format the hub uses, current or legacy ``feature_extractor_type`` ones with an int ``size``, and
every class default resolve as they do for Hugging Face), then turns its settings into a
``Preprocess``: resize, center crops, rescale, normalization and channel order, which the decoders
reproduce step for step as the processor's PIL backend and ``pipeline("image-classification")``
compute them.

Processor families: those that run the backend's standard steps unchanged (ViT, DeiT, BEiT,
Swin's ViT processor, BiT for DINOv2, CLIP, SigLIP, ...), and those with steps of their own
written out here: ConvNeXt (ConvNeXtV2 and ResNet use it: ``crop_pct``), EfficientNet (rescale
offset, ``include_top``) and MobileViT (no normalization, BGR channel order). Any other processor
that changes a step is refused with a ``ConfigError`` naming it, rather than guessed at.

The reference is the PIL backend (``...ImageProcessorPil``), whose resize is Pillow's: where
torchvision is installed transformers defaults to its torchvision backend, which resizes tensors
and so differs from Pillow's pixels by fractions of a level. The settings both read are the same.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from worker.config import ConfigError

log = logging.getLogger(__name__)

# Pillow's resample codes, as stored in preprocessor_config.json.
NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 0, 1, 2, 3, 4, 5
RESAMPLE_NAMES = {
    NEAREST: "NEAREST",
    LANCZOS: "LANCZOS",
    BILINEAR: "BILINEAR",
    BICUBIC: "BICUBIC",
    BOX: "BOX",
    HAMMING: "HAMMING",
}
# torch's closest interpolation, for the GPU's fallback resize where Triton can't run.
TORCH_MODE = {NEAREST: "nearest-exact", BILINEAR: "bilinear", BICUBIC: "bicubic", LANCZOS: "bicubic"}

# Where save_pretrained() puts the image processor's settings: its own file, or (a processor
# with a tokenizer, e.g. CLIP's, in transformers 5) the processor's.
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# Families whose PIL backend overrides steps in ways equivalent to the standard ones for images
# (they differ only for segmentation maps).
SEGMENTATION_ONLY_OVERRIDES = ("Beit", "MobileNetV2", "Segformer", "Data2VecVision")
# Families whose steps are written out in this module.
OWN_STEPS = ("ConvNext", "EfficientNet", "MobileViT")
# ConvNeXt's resize: below this shortest edge, resize to shortest_edge / crop_pct and crop.
CONVNEXT_FULL_RESIZE = 384


@dataclass(frozen=True)
class Preprocess:
    """The processor's steps, in order: resize, center crops, rescale, normalize, channel order.

    ``resize`` is ``("fixed", height, width)``, ``("shortest_edge", n)`` or None; each crop is a
    (height, width) center crop, padded with zeros where the image is smaller (as HF does).
    ``std_again`` is EfficientNet's ``include_top`` second division by the std.
    """

    processor: str
    resize: tuple | None
    resample: int
    crops: tuple[tuple[int, int], ...]
    rescale_factor: float | None
    rescale_offset: bool
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    std_again: tuple[float, float, float] | None
    flip_channels: bool

    @classmethod
    def from_processor(cls, processor) -> Preprocess:
        """The steps of a Hugging Face image processor (either backend), or ConfigError if this
        worker can't reproduce them.
        """
        family = _family(type(processor).__name__)
        _check_reproducible(family)

        def get(name: str, default=None):
            return getattr(processor, name, default)

        if get("do_pad"):
            raise ConfigError(f"--model: {family}ImageProcessor's do_pad is not supported", "model")
        resample = _resample_code(get("resample"))
        resize, crops = None, []
        size = get("size")
        if get("do_resize"):
            if family == "ConvNext":
                shortest = _size(size, "shortest_edge")
                if shortest is None:
                    raise ConfigError(
                        f"--model: ConvNextImageProcessor needs size.shortest_edge, got {size}", "model"
                    )
                if shortest < CONVNEXT_FULL_RESIZE:
                    resize = ("shortest_edge", int(shortest / (get("crop_pct") or 224 / 256)))
                    crops.append((shortest, shortest))
                else:
                    resize = ("fixed", shortest, shortest)
            elif _size(size, "shortest_edge") and not _size(size, "longest_edge"):
                resize = ("shortest_edge", _size(size, "shortest_edge"))
            elif _size(size, "height") and _size(size, "width") and not _size(size, "shortest_edge"):
                resize = ("fixed", _size(size, "height"), _size(size, "width"))
            else:
                raise ConfigError(
                    f"--model: {family}ImageProcessor's size {dict(size or {})} gives images of varying sizes; "
                    "the worker batches a fixed size (height/width, or shortest_edge with a center crop)",
                    "model",
                )
        if get("do_center_crop"):
            crop = get("crop_size")
            crops.append((_size(crop, "height"), _size(crop, "width")))
        pre = cls(
            processor=f"{family}ImageProcessor",
            resize=resize,
            resample=resample,
            crops=tuple((int(h), int(w)) for h, w in crops),
            rescale_factor=float(get("rescale_factor")) if get("do_rescale") else None,
            rescale_offset=bool(family == "EfficientNet" and get("do_rescale") and get("rescale_offset")),
            # MobileViT's processor never normalizes, whatever its do_normalize says.
            mean=_three(get("image_mean")) if get("do_normalize") and family != "MobileViT" else None,
            std=_three(get("image_std")) if get("do_normalize") and family != "MobileViT" else None,
            std_again=_three(get("image_std")) if family == "EfficientNet" and get("include_top") else None,
            flip_channels=bool(family == "MobileViT" and get("do_flip_channel_order")),
        )
        if pre.output_hw is None:
            raise ConfigError(
                f"--model: {pre.processor} without a center crop gives images of varying sizes; "
                "the worker batches a fixed size",
                "model",
            )
        return pre

    @property
    def output_hw(self) -> tuple[int, int] | None:
        """The batch's image size (None where it would vary with the input)."""
        if self.crops:
            return self.crops[-1]
        if self.resize and self.resize[0] == "fixed":
            return self.resize[1], self.resize[2]
        return None

    def resize_hw(self, in_h: int, in_w: int) -> tuple[int, int]:
        """The resized (height, width) of an (in_h, in_w) image, as HF computes it."""
        if self.resize is None:
            return in_h, in_w
        if self.resize[0] == "fixed":
            return self.resize[1], self.resize[2]
        edge = self.resize[1]
        short, long = (in_w, in_h) if in_w <= in_h else (in_h, in_w)
        new_short, new_long = edge, int(edge * long / short)
        return (new_long, new_short) if in_w <= in_h else (new_short, new_long)

    def crop_window(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) the crops keep of an (h, w) resized image; only where none pads."""
        top = left = 0
        for ch, cw in self.crops:
            top, left = top + (h - ch) // 2, left + (w - cw) // 2
            h, w = ch, cw
        return top, left, h, w

    def affine(self) -> tuple[list[float], list[float]]:
        """Per-channel (mul, add) with ``pixel = uint8 * mul + add``: rescale and normalizations in one."""
        mul, add = [1.0] * 3, [0.0] * 3
        if self.rescale_factor is not None:
            mul = [self.rescale_factor] * 3
            add = [-1.0 if self.rescale_offset else 0.0] * 3
        for mean, std in ((self.mean, self.std), ((0.0,) * 3 if self.std_again else None, self.std_again)):
            if mean is not None:
                mul = [m / s for m, s in zip(mul, std, strict=True)]
                add = [(a - mu) / s for a, mu, s in zip(add, mean, std, strict=True)]
        return mul, add

    def gpu_inexact(self) -> str | None:
        """Why the GPU JPEG path can't reproduce these steps exactly (None where it can)."""
        from worker.decode.pillow_resize import FILTERS

        if self.resize is None:
            return "it does not resize"
        if self.resample not in FILTERS:
            return f"its resample {RESAMPLE_NAMES.get(self.resample, self.resample)} has no Pillow-exact GPU kernel"
        bound = (self.resize[1],) * 2 if self.resize[0] == "shortest_edge" else self.resize[1:]
        for ch, cw in self.crops:
            if ch > bound[0] or cw > bound[1]:
                return f"its {ch}x{cw} center crop pads the smaller resized image"
            bound = (ch, cw)
        return None


def load_preprocess(model_dir: str) -> Preprocess:
    """The ``Preprocess`` of the model saved under ``model_dir`` (ConfigError if it has none usable)."""
    return Preprocess.from_processor(load_image_processor(model_dir))


def load_image_processor(model_dir: str):
    """The model's Hugging Face image processor, as transformers' pipelines load it."""
    path = next(
        (Path(model_dir) / name for name in IMAGE_PROCESSOR_FILES if (Path(model_dir) / name).is_file()), None
    )
    if path is None:
        raise ConfigError(
            f"--model: {Path(model_dir) / IMAGE_PROCESSOR_FILES[0]} is missing: the model needs an image "
            "processor config",
            "model",
        )
    try:
        json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model: {path} is not valid JSON ({exc})", "model") from exc
    from transformers import AutoImageProcessor
    from transformers.utils import logging as hf_logging

    # Without torchvision, transformers notes that it falls back to the PIL backend: the backend
    # this module reproduces in any case.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--model: transformers can't load its image processor: {reason}", "model") from exc
    finally:
        hf_logging.set_verbosity(verbosity)


def _family(class_name: str) -> str:
    """``ConvNextImageProcessorPil`` / ``...Fast`` / ``ConvNextFeatureExtractor`` -> ``ConvNext``."""
    for suffix in ("ImageProcessorPil", "ImageProcessorFast", "ImageProcessor", "FeatureExtractor"):
        if class_name.endswith(suffix):
            return class_name[: -len(suffix)]
    return class_name


def _check_reproducible(family: str) -> None:
    """ConfigError unless the family runs the PIL backend's standard steps or is in ``OWN_STEPS``."""
    if family in OWN_STEPS or family in SEGMENTATION_ONLY_OVERRIDES:
        return
    import transformers
    from transformers.image_processing_backends import PilBackend

    pil = getattr(transformers, f"{family}ImageProcessorPil", None)
    steps = ("_preprocess", "resize", "center_crop", "rescale", "normalize")
    changed = [s for s in steps if pil is None or getattr(pil, s, None) is not getattr(PilBackend, s)]
    if changed:
        what = f"changes the step(s) {', '.join(changed)}" if pil is not None else "has no PIL backend"
        raise ConfigError(
            f"--model: {family}ImageProcessor {what}, which this worker does not reproduce", "model"
        )


def _size(size, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if hasattr(size, "get") else None
    return int(value) if value else None


def _three(values) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ConfigError(f"--model: image_mean/image_std need 3 channels, got {values}", "model")
    return values


def _resample_code(resample) -> int:
    """A Pillow resample code from an int, a PIL enum or a torchvision InterpolationMode."""
    if resample is None:
        return BILINEAR  # the PIL backend's own default
    if isinstance(resample, int):  # ints and PIL.Image.Resampling
        return int(resample)
    by_name = {name.lower(): code for code, name in RESAMPLE_NAMES.items()}
    name = str(getattr(resample, "value", resample)).lower()
    if name in by_name:
        return by_name[name]
    raise ConfigError(f"--model: resample {resample!r} is not one Pillow has", "model")
