"""``python -m worker`` on bad input: one line naming the flag, exit code 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import write_images
from worker.__main__ import BAD_INPUT, main


@pytest.fixture
def inputs(tmp_path) -> Path:
    write_images(tmp_path / "in", 3)
    return tmp_path / "in"


def bad_runs(inputs: Path, tiny_model: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, the flag its error names)."""
    out = tmp_path / "out"
    a_file = tmp_path / "a-file"
    good = ["--input", str(inputs), "--output", str(out), "--model", str(tiny_model), "--device", "cpu"]

    def with_(**changes: str) -> list[str]:
        argv = list(good)
        for flag, value in changes.items():
            flag = "--" + flag.replace("_", "-")
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        return argv

    return {
        "missing model": (with_(model=str(tmp_path / "no-such-model")), "--model"),
        "a folder that is not a model": (with_(model=str(inputs)), "--model"),
        "an output path that is a file": (with_(output=str(a_file)), "--output"),
        "an output path under a file": (with_(output=str(a_file / "run")), "--output"),
        "missing input": (with_(input=str(tmp_path / "no-such-input")), "--input"),
        "an input that is a file": (with_(input=str(a_file)), "--input"),
        "batch size 0": (with_(batch_size="0"), "--batch-size"),
        "a batch size that is no number": (with_(batch_size="many"), "--batch-size"),
        "an unknown device": (with_(device="tpu"), "--device"),
        "GPU decode on a CPU": (with_(decode="gpu"), "--decode"),
        "an unknown flag": ([*good, "--fast"], "--fast"),
        "no model flag": (good[:4], "--model"),
    }


CASES = list(bad_runs(Path("i"), Path("m"), Path("t")))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_flag_and_exit_code_2(case, inputs, tiny_model, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    argv, flag = bad_runs(inputs, tiny_model, tmp_path)[case]
    assert main(argv) == BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m worker: error: "), err
    assert flag in err and "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing may be written for a bad input"


def test_the_process_exits_2_with_one_line(inputs, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker",
            "--input",
            str(inputs),
            "--output",
            str(tmp_path / "o"),
            "--model",
            str(inputs),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"python -m worker: error: --model {inputs} holds no config.json: not a save_pretrained() model directory"
    ]
