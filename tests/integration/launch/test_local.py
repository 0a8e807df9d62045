"""The local backend: the real worker under real torchrun, failing the way users will see it."""

from __future__ import annotations

import sys

import pytest

from components.launch.local import LocalRunError, run_local, worker_command


def test_command_uses_torchrun_only_for_several_processes():
    assert worker_command(["--x"], 1) == [sys.executable, "-m", "worker", "--x"]
    multi = worker_command(["--x"], 4, "/logs")
    assert multi[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert multi[-3:] == ["-m", "worker", "--x"] and "--log-dir=/logs" in multi
    with pytest.raises(ValueError):
        worker_command([], 0)


@pytest.mark.slow
def test_a_failed_run_ends_with_the_first_failing_ranks_error_not_its_peers_echo(tmp_path, tiny_model):
    lines: list[str] = []
    missing = tmp_path / "no-such-images"
    with pytest.raises(LocalRunError) as caught:
        run_local(
            [
                "--input",
                str(missing),
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
    assert err.returncode != 0 and not err.timed_out
    # Rank 0 found the input missing; rank 1 then lost its gloo peer. The message ends with the
    # cause, and names the echo as one.
    last = str(err).splitlines()[-1]
    assert last.startswith("rank 0 failed first: ") and last.endswith(
        f"input directory does not exist: {missing}"
    )
    assert str(err).splitlines()[0] == f"the local worker failed with exit code {err.returncode}: {last}"
    echoes = [line for line in str(err).splitlines() if "Connection closed by peer" in line]
    assert all(line.startswith("rank 1 failed too: ") for line in echoes), echoes
    # Streamed live with the rank prefix torchrun's --tee adds, so ranks stay apart in the log.
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
