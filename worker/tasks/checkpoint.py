"""A transformers checkpoint's files, checked in seconds before any weights load.

Every task that runs a ``save_pretrained()`` model checks it the same way: its config files
(fetched alone from gs:// or the hub), its weights' presence, and its config's model type
against the Auto class the task loads (``check_checkpoint``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from worker.config import ConfigError
from worker.decode.spec import IMAGE_PROCESSOR_FILES
from worker.storage import is_gcs, join, open_storage

log = logging.getLogger(__name__)

# What a save_pretrained() directory holds: the files the checks read, and the weights.
CONFIG_FILES = ("config.json", *IMAGE_PROCESSOR_FILES)
# Those a hub checkpoint holds (hub repositories keep the image processor in its own file).
HUB_CONFIG_FILES = CONFIG_FILES[:2]
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_checkpoint(path: Path, model: str, files: set[str] | None, mapping, task: str):
    """The checkpoint's config, or ConfigError unless ``path`` holds the config of a model type
    in ``mapping`` (a transformers Auto mapping) and ``files`` (the names of the model's files;
    None where unknown) its weights.
    """
    from transformers import AutoConfig

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
    if type(config) not in mapping:
        raise ConfigError(
            f"--model {model} is a {config.model_type!r} model, which has no {task} class", "model"
        )
    return config


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
            files = [hf_hub_download(repo_id, name, local_files_only=True) for name in HUB_CONFIG_FILES]
        except LocalEntryNotFoundError:
            files = [hf_hub_download(repo_id, name) for name in HUB_CONFIG_FILES]
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
        missing = next((name for name in HUB_CONFIG_FILES if name in str(exc)), "config file")
        raise ConfigError(f"--model {repo_id} has no {missing} on the hub", "model") from exc
    except OSError as exc:  # a connection that failed in another way
        return unreachable_hub(repo_id, exc)
    return Path(files[0]).parent


def unreachable_hub(repo_id: str, exc: Exception) -> None:
    log.warning(
        "could not reach the hub to check --model %s (%s); the worker checks it at start", repo_id, exc
    )


def features_tensor(out):
    """What ``get_image_features``/``get_text_features`` return, as a tensor: transformers
    versions return either the tensor or an output whose ``pooler_output`` it is.
    """
    return out if hasattr(out, "dim") else out.pooler_output
