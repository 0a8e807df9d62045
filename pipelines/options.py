"""Command-line options made from the pipeline's parameters, so no default or help text is repeated."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from pipelines.batch_inference import PARAMETER_TYPES


def add_parameter_options(
    p, inputs: Mapping[str, Any], *, defaults: bool, overrides: Mapping[str, Any] | None = None
) -> None:
    """One option per pipeline parameter, e.g. ``--images-uri`` for ``images_uri``.

    The pipeline is the one place where parameters get defaults and descriptions. With
    ``defaults=False`` an option left out is absent from the parsed namespace, so a
    submission sends only what was given and the compiled defaults apply to the rest.

    Args:
        p: The parser or argument group to add the options to.
        inputs: kfp ``InputSpec``s by parameter name (the pipeline's ``component_spec.inputs``).
        defaults: Whether an option left out takes its default.
        overrides: Defaults that replace the pipeline's for this command (with ``defaults``).
    """
    overrides = overrides or {}
    for name, spec in inputs.items():
        kind = PARAMETER_TYPES[spec.type]
        value = overrides.get(name, spec.default)
        help_text = " ".join((spec.description or "").split()) + f" (default: {value!r})"
        options: dict[str, Any] = {
            "dest": name,
            "default": value if defaults else argparse.SUPPRESS,
            "help": help_text.replace("%", "%%"),
        }
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = kind
        p.add_argument(f"--{name.replace('_', '-')}", **options)
