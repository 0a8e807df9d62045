"""Offline manifest validation: CRD ``openAPIV3Schema`` (strict on unknown fields) and Kubernetes' own schemas."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33"  # GKE versions with Kueue + queued provisioning for A3 Ultra


@functools.cache
def _load_crd(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def crd_schema(crds_dir: Path, filename: str, version: str) -> dict:
    """The ``openAPIV3Schema`` of one version of a CRD file (read once per session)."""
    crd = _load_crd(crds_dir / filename)
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would reject under ``fieldValidation=Strict`` (not in the schema)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(value, dict):
        properties, additional = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += unknown_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(additional, dict):
                found += unknown_fields(item, additional, f"{path}.{key}")
            elif properties is not None or additional is False:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


def _go_regex_pattern(validator, pattern: str, instance, schema):
    """``pattern`` with Go RE2 syntax: CRDs put inline flags like ``(?i)`` after ``^``, which Python refuses."""
    if not validator.is_type(instance, "string"):
        return
    flags = 0
    if "(?i)" in pattern:
        pattern, flags = pattern.replace("(?i)", ""), re.IGNORECASE
    if not re.search(pattern, instance, flags):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


# OpenAPI v3 schemas of CRDs use draft-4 keywords (boolean exclusiveMinimum and the like).
CrdValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"pattern": _go_regex_pattern})


def assert_valid_for_crd(obj: dict, schema: dict) -> None:
    """Schema-valid (types, enums, patterns, required) and free of fields the CRD does not declare."""
    CrdValidator(schema).validate(obj)
    assert unknown_fields(obj, schema) == []


def assert_valid_for_kubernetes(obj: dict) -> None:
    """Valid for Kubernetes' own (strict) schema of ``obj``'s kind."""
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def pod_template_resource(template: dict) -> dict:
    """A pod template wrapped as a core/v1 PodTemplate, the kind whose schema holds PodTemplateSpec."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "template"}, "template": template}
