"""components.launch.failures: the cause of a failed torchrun gang, told from its echoes.

The log lines have the shapes torch 2.x prints: torchrun ``--tee``'s ``[default<n>]:`` prefix,
torch's ``[rank<n>]:`` prefix on a distributed error, gloo's lost connection, the worker's
``[rank N] ERROR`` line and torchrun's own ``ChildFailedError`` summary.
"""

from __future__ import annotations

from components.launch.failures import EXCERPT_LINES, first_cause, process_errors

GLOO_ECHO = [
    "[default0]:[rank0]: Traceback (most recent call last):",
    '[default0]:[rank0]:   File "/app/worker/dist.py", line 50, in broadcast',
    "[default0]:[rank0]:     dist.broadcast_object_list(box, src=0, group=self.control_group)",
    "[default0]:[rank0]:            ^^^^^^^^^^^^^^^^^^^^^",
    "[default0]:[rank0]: RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:8841",
]
CAUSE = [
    "[default1]:Traceback (most recent call last):",
    '[default1]:  File "/app/worker/tasks/classification.py", line 40, in load',
    "[default1]:    raise ValueError(f'{path}: not an image-classification model')",
    "[default1]:ValueError: /models/bad: not an image-classification model",
]
TORCHRUN = [
    "E1124 20:00:09.355000 21579 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 1",
    "Traceback (most recent call last):",
    '  File "/usr/lib/python3/site-packages/torch/distributed/run.py", line 1032, in <module>',
    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
    "============================================================",
]


def test_the_rank_that_failed_first_is_found_even_when_its_peer_printed_its_echo_before():
    errors = process_errors(["[default0]:step 1", *GLOO_ECHO, "[default1]:step 1", *CAUSE, *TORCHRUN])
    rank = {e.process: e for e in errors}
    assert rank["0"].echo and "Connection closed by peer" in rank["0"].cause
    assert (
        not rank["1"].echo and rank["1"].cause == "ValueError: /models/bad: not an image-classification model"
    )
    first = first_cause(errors)
    assert first is rank["1"]
    assert first.excerpt == tuple(CAUSE)
    assert rank[""].echo and "ChildFailedError" in rank[""].cause  # torchrun's own summary is an echo too


def test_the_workers_refusal_of_a_bad_input_is_a_cause():
    line = "[default0]:python -m worker: error: input directory does not exist: /data/x"
    (error,) = process_errors(["[default0]:loading", line, *GLOO_ECHO[:0]])
    assert (error.process, error.echo, error.cause) == (
        "0",
        False,
        "python -m worker: error: input directory does not exist: /data/x",
    )


def test_a_logged_error_is_a_cause():
    line = "[default0]:2026-11-24 20:00:01,743 [rank 0] ERROR worker: input directory does not exist: /data/x"
    errors = process_errors(
        ["[default1]:2026-11-24 20:00:00,100 [rank 1] INFO worker: planning", line, *GLOO_ECHO[:0]]
    )
    (error,) = errors
    assert (error.process, error.echo, error.excerpt) == ("0", False, (line,))
    assert error.cause.endswith("ERROR worker: input directory does not exist: /data/x")


def test_a_process_that_printed_a_cause_and_later_an_echo_is_reported_by_its_cause():
    lines = [*CAUSE, "[default1]:", *[line.replace("[default0]", "[default1]") for line in GLOO_ECHO]]
    (error,) = process_errors(lines)
    assert error.cause.startswith("ValueError: /models/bad")


def test_when_every_error_is_an_echo_the_first_one_is_reported():
    later = [line.replace("[default0]", "[default3]").replace("[rank0]", "[rank3]") for line in GLOO_ECHO]
    errors = process_errors([*GLOO_ECHO, *later])
    assert [e.process for e in errors] == ["0", "3"]
    assert first_cause(errors) is errors[0]
    assert first_cause([]) is None


def test_a_lone_process_without_prefixes_is_read_whole():
    lines = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>', "KeyError: 'logits'"]
    (error,) = process_errors(["loading", *lines])
    assert (error.process, error.cause, error.excerpt) == ("", "KeyError: 'logits'", tuple(lines))


def test_a_long_traceback_is_cut_to_its_head_and_its_end():
    frames = [f'[default0]:  File "f{i}.py", line {i}, in f{i}' for i in range(100)]
    lines = ["[default0]:Traceback (most recent call last):", *frames, "[default0]:RecursionError: too deep"]
    (error,) = process_errors(lines)
    assert len(error.excerpt) == EXCERPT_LINES
    assert error.excerpt[0] == lines[0] and error.excerpt[-1] == lines[-1]
