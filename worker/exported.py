"""Models that are not transformers checkpoints: a torch.export program or a TorchScript file.

``--model`` names the file (local or gs://); beside it lie ``preprocess.json``, the steps the
decoders reproduce, and optionally ``labels.txt``, one label name per output index::

    {"size": 256, "crop": 224, "interpolation": "bicubic",
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channel_order": "RGB"}

``size`` is the shorter edge's length (an int, as torchvision's ``Resize(256)``) or
``[height, width]``; ``crop`` a center crop (an int or ``[height, width]``, optional);
``interpolation`` one of Pillow's filters (default bilinear); pixels are scaled by ``rescale``
(default 1/255), then normalized by ``mean`` and ``std`` (default none); ``channel_order`` is
RGB (default) or BGR. The model takes a float batch ``(N, 3, H, W)`` and returns a tensor with
the batch first (a tuple's or dict's first tensor is taken): logits for ``--task
classification``, features for ``--task embedding``. On a GPU it runs under bfloat16 autocast,
its weights as saved.
"""

from __future__ import annotations

import json
from pathlib import Path

from worker.config import ConfigError
from worker.decode.spec import RESAMPLE_NAMES, Preprocess
from worker.storage import is_gcs, join, open_storage

# File name endings of exported models: torch.export's archive, TorchScript's.
PT2_SUFFIXES = (".pt2",)
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript")
PREPROCESS_FILE = "preprocess.json"
LABELS_FILE = "labels.txt"
# The files of an exported model besides the model's own: what the node fetches with it.
SIDECAR_FILES = (PREPROCESS_FILE, LABELS_FILE)
_PREPROCESS_KEYS = {"size", "crop", "interpolation", "mean", "std", "rescale", "channel_order"}


def is_exported(model: str) -> bool:
    """Whether ``--model`` names an exported model's file (by its ending)."""
    return model.rstrip("/").lower().endswith((*PT2_SUFFIXES, *TORCHSCRIPT_SUFFIXES))


def sidecar(model_file: str, name: str) -> str:
    """The URI or path of the file ``name`` beside the model's file."""
    return join(model_file.rstrip("/").rsplit("/", 1)[0], name)


def parse_preprocess(data: bytes, where: str) -> Preprocess:
    """The ``Preprocess`` of a preprocess.json's bytes; ConfigError (naming --model) if malformed."""
    try:
        spec = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"--model: {where} is not valid JSON ({exc})", "model") from None
    if not isinstance(spec, dict) or "size" not in spec:
        raise ConfigError(f'--model: {where} needs at least a "size"', "model")
    if unknown := sorted(set(spec) - _PREPROCESS_KEYS):
        raise ConfigError(
            f"--model: {where} has unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_PREPROCESS_KEYS))})",
            "model",
        )
    by_name = {name.lower(): code for code, name in RESAMPLE_NAMES.items()}
    interpolation = str(spec.get("interpolation", "bilinear")).lower()
    if interpolation not in by_name:
        raise ConfigError(
            f"--model: {where}: interpolation {interpolation!r} is not one of {', '.join(by_name)}", "model"
        )
    order = str(spec.get("channel_order", "RGB")).upper()
    if order not in ("RGB", "BGR"):
        raise ConfigError(f"--model: {where}: channel_order must be RGB or BGR, got {order!r}", "model")
    try:
        size, crop = spec["size"], spec.get("crop")
        resize = ("shortest_edge", int(size)) if isinstance(size, int) else ("fixed", *_hw(size))
        crops = (_hw(crop),) if crop is not None else ()
        mean, std = spec.get("mean"), spec.get("std")
        if (mean is None) != (std is None):
            raise ValueError("mean and std go together")
        pre = Preprocess(
            processor=PREPROCESS_FILE,
            resize=resize,
            resample=by_name[interpolation],
            crops=crops,
            rescale_factor=float(spec.get("rescale", 1 / 255)),
            rescale_offset=False,
            mean=_three(mean) if mean is not None else None,
            std=_three(std) if std is not None else None,
            std_again=None,
            flip_channels=order == "BGR",
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--model: {where}: {exc}", "model") from None
    if pre.output_hw is None:
        raise ConfigError(
            f"--model: {where}: a shorter-edge size without a crop gives images of varying sizes; "
            "add a crop, or give size as [height, width]",
            "model",
        )
    return pre


def _hw(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def _three(values) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"mean and std need 3 channels, got {values}")
    return values


def load_preprocess(model_file: str) -> Preprocess:
    """The preprocessing beside a local model file."""
    path = Path(sidecar(model_file, PREPROCESS_FILE))
    if not path.is_file():
        raise ConfigError(f"--model: {path} is missing: an exported model needs one beside it", "model")
    return parse_preprocess(path.read_bytes(), str(path))


def load_label_names(model_file: str) -> list[str] | None:
    """The label names of labels.txt beside a local model file; None where there is none."""
    path = Path(sidecar(model_file, LABELS_FILE))
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_exported(model: str, project: str | None = None) -> None:
    """In seconds: the model file exists and its preprocess.json is one the decoders reproduce.

    Raises:
        ConfigError: What is wrong, naming --model.
    """
    storage = open_storage(model, project=project)
    if not storage.exists(model):
        raise ConfigError(f"--model {model}: no such file", "model")
    where = sidecar(model, PREPROCESS_FILE)
    try:
        data = storage.read(where)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(
            f"--model {model}: no {PREPROCESS_FILE} beside it (size, crop, interpolation, mean, std, "
            "channel_order: see docs/tasks.md)",
            "model",
        ) from None
    parse_preprocess(data, where)
    if not is_gcs(model) and Path(model).is_dir():
        raise ConfigError(f"--model {model} is a directory, not an exported model's file", "model")


def load_exported(model_file: str, device):
    """The exported model on ``device``, in eval mode, callable on a pixel batch (``ExportedModel``)."""
    import torch

    if model_file.lower().endswith(PT2_SUFFIXES):
        module = torch.export.load(model_file).module()
    else:
        module = torch.jit.load(model_file, map_location=device)
    module = module.to(device)
    if hasattr(module, "eval"):
        try:
            module.eval()
        except NotImplementedError:  # torch.export's modules refuse train/eval switches
            pass
    return ExportedModel(module, device)


class ExportedModel:
    """An exported module as a task calls it: float32 in, its first output tensor out, in float32.

    On a GPU the forward runs under bfloat16 autocast (without its weight cache, which a CUDA
    graph capture would freeze).
    """

    def __init__(self, module, device):
        self.module = module
        self.device = device

    def modules(self):
        return self.module.modules()

    def __call__(self, pixels):
        import torch

        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                out = self.module(pixels.float())
        else:
            out = self.module(pixels.float())
        return first_tensor(out).float()


def first_tensor(out):
    """A model's output tensor: itself, or the first of a tuple, list or dict (a ModelOutput)."""
    import torch

    while not isinstance(out, torch.Tensor):
        if isinstance(out, dict):
            out = next(iter(out.values()))
        elif isinstance(out, (tuple, list)):
            out = out[0]
        else:
            raise TypeError(f"the exported model returned a {type(out).__name__}, not a tensor")
    return out
