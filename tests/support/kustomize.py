"""The objects ``kubectl apply -k DIR`` applies, for kustomizations that only list resources."""

from __future__ import annotations

from pathlib import Path

import yaml


def rendered(directory: Path) -> list[dict]:
    """The objects ``kubectl apply -k directory`` applies: its resources, kustomizations recursively."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(spec) <= {"apiVersion", "kind", "resources"}, "only resources: the loader here renders no more"
    docs = []
    for entry in spec["resources"]:
        path = (directory / entry).resolve()
        docs += rendered(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs
