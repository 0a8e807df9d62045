"""The image-classification task: any ``AutoModelForImageClassification`` model, top-1 label and score.

Its part rows are ``image_id, classification, label_index, score, uri``: the object's stem, the
top-1 label's name and index, that label's score, and the object. The score is what
``pipeline("image-classification")`` reports for the model: the softmax probability, or the
sigmoid for multi-label (and single-label) heads, or the raw logit for regression heads.

``check_model`` answers, in seconds and before any GPU is provisioned, whether a model is one
the worker can run: it loads as an image classifier and its image processor is one the decoders
reproduce (``worker.decode.spec``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from worker.config import ConfigError
from worker.decode.spec import Preprocess, load_preprocess
from worker.results import PART_COLUMNS, image_id
from worker.storage import ObjectInfo, is_gcs, join, open_storage

log = logging.getLogger(__name__)

NAME = "image-classification"
# What a save_pretrained() directory holds: the files check_model reads, and the weights.
CONFIG_FILES = ("config.json", "preprocessor_config.json")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ImageClassification:
    """The model, its label names and its preprocessing, loaded for inference on ``device``."""

    columns = PART_COLUMNS

    def __init__(self, path: str, device: torch.device):
        self.model, self.label_names = load_model(path, device)
        self.preprocess: Preprocess = load_preprocess(path)
        self.scores_of = score_function(self.model.config)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return top1(self.model, pixels, self.scores_of)

    def rows(self, objects: Sequence[ObjectInfo], outputs: Sequence[list]) -> list[tuple]:
        scores, labels = outputs
        return [
            (image_id(obj.uri), self.label_names[label], label, f"{score:.6f}", obj.uri)
            for obj, score, label in zip(objects, scores, labels, strict=True)
        ]


def load(path: str, device: torch.device) -> ImageClassification:
    return ImageClassification(path, device)


def softmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1)


def sigmoid(logits: torch.Tensor) -> torch.Tensor:
    return logits.sigmoid()


def identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def score_function(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function of the logits that ``pipeline("image-classification")`` reports by default."""
    if config.problem_type == "regression":
        return identity
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return sigmoid
    return softmax


def top1(
    model, pixels: torch.Tensor, scores_of: Callable[[torch.Tensor], torch.Tensor] = softmax
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-1 score and label index of each image, in float32."""
    logits = model(pixel_values=pixels).logits
    return scores_of(logits.float()).max(-1)


def load_model(path: str, device: torch.device):
    """AutoModelForImageClassification: bf16 + SDPA on GPU, fp32 on CPU, in eval mode."""
    from transformers import AutoModelForImageClassification

    if device.type == "cuda":
        model = AutoModelForImageClassification.from_pretrained(
            path, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    else:
        model = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32)
    model.eval().to(device)
    if device.type == "cuda":
        keep_classifier_in_fp32(model)
    labels = model.config.id2label or {}
    num_labels = model.config.num_labels
    label_names = [str(labels.get(i, labels.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)]
    return model, label_names


def keep_classifier_in_fp32(model) -> None:
    """Run the classification head in float32 on bf16 features.

    The head turns the features into logits whose top two are often close; rounding the
    logits' inputs and weights to bf16 is what flips most labels against a float32 run
    (benchmarks/NOTES.md), and the head is a tiny share of the FLOPs.
    Hugging Face image classifiers name their head ``classifier``.
    """
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        return
    head.float()
    head.register_forward_pre_hook(
        lambda module, args: tuple(
            a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
        )
    )


def check_model(model: str, *, project: str | None = None, decode: str = "auto") -> None:
    """Check quickly that ``model`` (a local directory, a hub id or a gs:// directory) is an
    image classifier whose preprocessing the worker reproduces; reads only its two config files.

    A hub model is checked from the local Hugging Face cache, else from the hub; where the hub
    can't be reached the check is left to the worker's start-up (with a warning).

    Raises:
        ConfigError: What is wrong, in one line naming --model (or --decode).
    """
    with model_config_files(model, project) as (path, files):
        if path is None:
            return
        check_model_dir(path, model, files)
        pre = load_preprocess(str(path))
        if decode == "gpu" and (inexact := pre.gpu_inexact()):
            raise ConfigError(
                f"--decode gpu can't reproduce {pre.processor} of --model {model} exactly ({inexact}): "
                "use --decode auto or cpu",
                "decode",
            )


def check_model_dir(path: Path, model: str, files: set[str] | None) -> None:
    """ConfigError unless ``path`` holds the config of an image-classification model and ``files``
    (the names of the model's files; None where unknown) its weights.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    if not (path / "config.json").is_file():
        raise ConfigError(
            f"--model {model} holds no config.json: not a save_pretrained() model directory", "model"
        )
    if files is not None and not files & set(WEIGHT_FILES):
        raise ConfigError(f"--model {model} holds no weights ({', '.join(WEIGHT_FILES[::2])})", "model")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"--model {model}: transformers can't read its config.json: {reason}", "model"
        ) from exc
    if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
        raise ConfigError(
            f"--model {model} is a {config.model_type!r} model, which has no image-classification class",
            "model",
        )
    heads = [a for a in config.architectures or () if "ForImageClassification" in a]
    if config.architectures and not heads:
        raise ConfigError(
            f"--model {model} holds a {config.architectures[0]}, not an image classifier: its "
            "classification head would be random",
            "model",
        )


@contextlib.contextmanager
def model_config_files(model: str, project: str | None) -> Iterator[tuple[Path | None, set[str] | None]]:
    """A local directory holding the model's config files (None where they can't be reached now),
    and the names of all the model's files (None where unknown).
    """
    if is_gcs(model):
        storage = open_storage(model, project=project)
        try:
            names = {o.uri.rsplit("/", 1)[-1] for o in storage.list(model.rstrip("/") + "/")}
        except FileNotFoundError:
            names = set()
        if not names:
            raise ConfigError(f"--model {model}: no objects under that prefix", "model")
        with tempfile.TemporaryDirectory(prefix="model-config-") as tmp:
            for name in CONFIG_FILES:
                if name in names:
                    (Path(tmp) / name).write_bytes(storage.read(join(model, name)))
            yield Path(tmp), names
        return
    path = Path(model).expanduser()
    if path.is_dir():
        yield path, {p.name for p in path.iterdir()}
        return
    if path.exists():
        raise ConfigError(f"--model {model} is a file; give the directory save_pretrained() wrote", "model")
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise ConfigError(f"--model {model}: no such directory", "model")
    yield hub_config_files(model), None


def hub_config_files(repo_id: str) -> Path | None:
    """The hub model's snapshot folder holding its config files (cached, else fetched: two small
    files); None where the hub can't be reached.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        try:
            files = [hf_hub_download(repo_id, name, local_files_only=True) for name in CONFIG_FILES]
        except LocalEntryNotFoundError:
            files = [hf_hub_download(repo_id, name) for name in CONFIG_FILES]
    # First: huggingface_hub reports an unreachable hub (offline, no route) as a local miss, which
    # is an EntryNotFoundError too.
    except LocalEntryNotFoundError as exc:
        return unreachable_hub(repo_id, exc)
    except HFValidationError as exc:
        raise ConfigError(f"--model {repo_id}: not a directory here, nor a valid hub id", "model") from exc
    except GatedRepoError as exc:
        raise ConfigError(
            f"--model {repo_id} is gated on the hub: accept its terms and set HF_TOKEN", "model"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ConfigError(
            f"--model {repo_id}: no such directory here, nor model on the hub", "model"
        ) from exc
    except EntryNotFoundError as exc:
        missing = next((name for name in CONFIG_FILES if name in str(exc)), "config file")
        raise ConfigError(f"--model {repo_id} has no {missing} on the hub", "model") from exc
    except OSError as exc:  # a connection that failed in another way
        return unreachable_hub(repo_id, exc)
    return Path(files[0]).parent


def unreachable_hub(repo_id: str, exc: Exception) -> None:
    log.warning(
        "could not reach the hub to check --model %s (%s); the worker checks it at start", repo_id, exc
    )
