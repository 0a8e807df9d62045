"""The local backend: the real worker under real torchrun, failing the way users will see it."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from components.launch.local import LocalRunError, run_local, worker_command
from worker.results import PLAN_FILE


def test_command_uses_torchrun_only_for_several_processes():
    assert worker_command(["--x"], 1) == [sys.executable, "-m", "worker", "--x"]
    multi = worker_command(["--x"], 4, "/logs")
    assert multi[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert multi[-3:] == ["-m", "worker", "--x"] and "--log-dir=/logs" in multi
    with pytest.raises(ValueError):
        worker_command([], 0)


@pytest.mark.slow
def test_a_failed_run_ends_with_the_first_failing_ranks_error_not_its_peers_echo(tmp_path, tiny_model):
    # A results prefix whose plan index is a directory: rank 0, which alone reads the plan, fails
    # with a traceback while rank 1 waits for the plan in a gloo broadcast and loses its peer.
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(images / "red.jpg")
    (tmp_path / "out" / PLAN_FILE).mkdir(parents=True)
    lines: list[str] = []
    with pytest.raises(LocalRunError) as caught:
        run_local(
            [
                "--input",
                str(images),
                "--output",
                str(tmp_path / "out"),
                "--model",
                str(tiny_model),
                "--device",
                "cpu",
            ],
            2,
            log=lines.append,
        )
    err = caught.value
    message = str(err).splitlines()
    assert err.returncode != 0 and not err.timed_out
    cause = f"IsADirectoryError: [Errno 21] Is a directory: '{tmp_path / 'out' / PLAN_FILE}'"
    # The cause opens the message and ends it (the end of its traceback); the echo is named as one.
    assert (
        message[0] == f"the local worker failed with exit code {err.returncode}: rank 0 failed first: {cause}"
    )
    assert message[-1].endswith(cause) and message[-1].startswith("[default0]:")
    assert f"rank 0 failed first: {cause}" in message
    echoes = [line for line in message if "Connection closed by peer" in line]
    assert all(line.startswith("rank 1 failed too: ") for line in echoes), echoes
    # The live log had both ranks' lines, each with its rank's prefix.
    assert any(line.startswith("[default0]:") for line in lines)
    assert any(line.startswith("[default1]:") for line in lines)


@pytest.mark.slow
def test_single_process_error_carries_the_workers_message(tmp_path):
    with pytest.raises(LocalRunError) as caught:
        run_local(
            [
                "--input",
                str(tmp_path),
                "--output",
                str(tmp_path / "out"),
                "--model",
                "m",
                "--batch-size",
                "0",
            ],
            1,
            log=lambda line: None,
        )
    assert "--batch-size must be at least 1" in str(caught.value)
    assert f"exit code {caught.value.returncode}" in str(caught.value)


@pytest.mark.slow
def test_timeout_kills_torchrun_and_every_rank(tmp_path, tiny_model):
    # Starting torchrun and importing torch in two ranks takes seconds; 0.5 s always cuts it short.
    lines: list[str] = []
    with pytest.raises(LocalRunError) as caught:
        run_local(
            ["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--model", str(tiny_model)],
            2,
            log=lines.append,
            timeout_s=0.5,
        )
    assert caught.value.timed_out and "timed out" in str(caught.value)
    assert caught.value.returncode != 0
