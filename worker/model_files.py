"""The model's files on this node: fetched once per node into a local cache.

MODEL is a Hugging Face hub id, a local directory, or a gs:// directory. Local rank 0 of
each node fetches it into a node-local cache; the other local ranks wait at a barrier and
then load from that cache, so a node never downloads twice. A gs:// model is cached by its
URI and the generations of its files, so a model rewritten in place is fetched anew.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from worker.archives.packed import file_crc32c
from worker.exported import SIDECAR_FILES, is_exported
from worker.storage import ObjectInfo, folder, is_gcs, join, open_storage, split_uri

if TYPE_CHECKING:
    from worker.dist import Topology

log = logging.getLogger(__name__)

# A gs:// model's files are read in pieces of this size, this many at once.
DOWNLOAD_PIECE = 32 << 20
DOWNLOAD_STREAMS = 8


class ModelChangedError(RuntimeError):
    """A gs:// model's files changed between their listing and their download."""


def _gcs_listing(model_uri: str, project: str | None) -> list[ObjectInfo]:
    objects = list(open_storage(model_uri, project=project).list(folder(model_uri)))
    if not objects:
        raise FileNotFoundError(f"no model files under {model_uri}")
    return objects


def _gcs_cache_dir(model_uri: str, objects: list[ObjectInfo], cache_root: str) -> Path:
    """One folder per URI *and version* of its files: a model rewritten in place is fetched
    anew, never served from an older copy (nodes could otherwise run different models).
    """
    digest = hashlib.sha256(model_uri.encode())
    for o in sorted(objects, key=lambda o: o.uri):
        digest.update(f"\0{o.uri}\0{o.size}\0{o.generation}\0{o.crc32c}".encode())
    return Path(cache_root) / f"gcs-{digest.hexdigest()[:16]}"


def _download_gcs_dir(model_uri: str, objects: list[ObjectInfo], target: Path, project: str | None) -> None:
    """Every file of the model into ``target``, published at once: each file in ranged pieces
    read in parallel and written in place (one GCS stream is a fraction of a node's bandwidth,
    and gigabytes of weights never sit in memory), then checked against its listed CRC32C.

    Raises:
        ModelChangedError: A file's bytes are not those listed (the model is being rewritten).
    """
    storage = open_storage(model_uri, project=project)
    prefix = folder(model_uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        files = []
        for obj in objects:
            dest = staging / obj.uri[len(prefix) :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as fh:
                fh.truncate(obj.size)
            files.append((obj, dest))
        pieces = [
            (obj, dest, at, min(DOWNLOAD_PIECE, obj.size - at))
            for obj, dest in files
            for at in range(0, obj.size, DOWNLOAD_PIECE)
        ]
        with ThreadPoolExecutor(DOWNLOAD_STREAMS, thread_name_prefix="model-download") as pool:
            list(pool.map(lambda piece: _download_piece(storage, *piece), pieces))
        for obj, dest in files:
            if obj.crc32c and file_crc32c(dest) != obj.crc32c:
                raise ModelChangedError(f"{obj.uri} changed while it was downloaded; fetch the model again")
        # A rename publishes the whole folder at once: a reader never sees half a model.
        os.rename(staging, target)
    except OSError:
        if target.exists():  # Someone else published it first; theirs is identical.
            return
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download_piece(storage, obj: ObjectInfo, dest: Path, at: int, length: int) -> None:
    data = storage.read_range(obj.uri, at, length)
    if len(data) != length:
        raise ModelChangedError(
            f"{obj.uri} is shorter than listed ({obj.size:,} bytes); fetch the model again"
        )
    fd = os.open(dest, os.O_WRONLY)
    try:
        os.pwrite(fd, data, at)
    finally:
        os.close(fd)


def _exported_listing(model_uri: str, project: str | None) -> tuple[str, list[ObjectInfo]]:
    """An exported model's folder and its files: the model's own and those beside it that it uses."""
    directory = model_uri.rstrip("/").rsplit("/", 1)[0]
    wanted = {model_uri.rstrip("/"), *(join(directory, name) for name in SIDECAR_FILES)}
    objects = [o for o in open_storage(model_uri, project=project).list(folder(directory)) if o.uri in wanted]
    if not any(o.uri == model_uri.rstrip("/") for o in objects):
        raise FileNotFoundError(f"no model file {model_uri}")
    return directory, objects


def fetch_model(
    model: str,
    cache_root: str,
    *,
    download: bool,
    project: str | None = None,
    hub_files: list[str] | None = None,
) -> str:
    """A local directory (or hub id resolvable offline) holding the model, or an exported model's
    local file (with the files beside it that it uses); of a hub id only ``hub_files`` where
    given (its snapshot folder still names the commit).
    """
    if is_gcs(model):
        split_uri(model)  # validates the URI early
        if is_exported(model):
            directory, objects = _exported_listing(model, project)
        else:
            directory, objects = model, _gcs_listing(model, project)
        target = _gcs_cache_dir(model, objects, cache_root)
        if download and not target.exists():
            log.info("downloading %s to %s", model, target)
            _download_gcs_dir(directory, objects, target, project)
        if not target.exists():
            raise FileNotFoundError(f"model {model} was not fetched into {target}")
        return str(target / model.rstrip("/").rsplit("/", 1)[1]) if is_exported(model) else str(target)
    if Path(model).is_dir() or (is_exported(model) and Path(model).is_file()):
        return model
    if model.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model directory does not exist: {model}")
    # A hub id: snapshot_download fills the shared HF cache; other ranks then read it offline.
    from huggingface_hub import snapshot_download

    return snapshot_download(model, local_files_only=not download, allow_patterns=hub_files)


def fetch_model_once_per_node(model: str, topo: Topology, cache_root: str, project: str | None) -> str:
    path = None
    if topo.local_rank == 0:
        path = fetch_model(model, cache_root, download=True, project=project)
    topo.barrier()
    if path is None:
        path = fetch_model(model, cache_root, download=False, project=project)
    return path
