"""docs/running.md: its parameter table is the pipeline's, parameter for parameter."""

from __future__ import annotations

import json
import re

import yaml

from pipelines.docs import BEGIN, DOC, END, render, update
from tests.support import ROOT

_IR_TYPES = {
    "STRING": "string",
    "NUMBER_INTEGER": "integer",
    "BOOLEAN": "boolean",
    "NUMBER_DOUBLE": "number",
    "LIST": "list",
}


def _doc_rows() -> dict[str, tuple[str, object, str]]:
    table = DOC.read_text(encoding="utf-8").split(BEGIN)[1].split(END)[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        name, kind, default, description = re.fullmatch(
            r"\| `(\w+)` \| (\w+) \| `(.*)` \| (.*) \|", line
        ).groups()
        rows[name] = (kind, json.loads(default), description)
    return rows


def test_the_table_is_current():
    assert not update(DOC, check=True), (
        "docs/running.md's parameter table is stale: run `python -m pipelines docs`"
    )


def test_every_parameter_of_the_compiled_pipeline_is_documented_with_its_default():
    for flavour in ("kubeflow", "vertex"):
        ir = next(yaml.safe_load_all((ROOT / "compiled" / f"batch_inference_{flavour}.yaml").read_text()))
        params = ir["root"]["inputDefinitions"]["parameters"]
        rows = _doc_rows()
        assert set(rows) == set(params)
        for name, spec in params.items():
            kind, default, description = rows[name]
            assert (kind, default) == (_IR_TYPES[spec["parameterType"]], spec["defaultValue"]), name
            assert description.split()[:4] == spec["description"].split()[:4], name


def test_a_stale_table_is_replaced_and_the_rest_kept():
    text = f"intro\n{BEGIN}\n| old | table |\n{END}\noutro\n"
    fresh = render(text)
    assert fresh.startswith(f"intro\n{BEGIN}\n| Parameter |") and fresh.endswith(f"{END}\noutro\n")
    assert "| old | table |" not in fresh and "`incremental`" in fresh
