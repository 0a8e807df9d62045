"""Which rank of a failed run failed first, and why: the cause, not its echoes.

When one rank of a torchrun gang dies, its peers die a moment later in a collective, with
``Connection closed by peer`` (gloo), an aborted NCCL communicator or a store timeout, and
torchrun adds its own ``ChildFailedError`` summary. Whoever reads the end of the log sees those
echoes. This module reads the ranks' logs (torchrun's ``--tee`` prefixes every line with
``[default<local rank>]:``), finds each process's error (the exception of its last traceback,
or the line the worker printed as its error), tells a cause from an echo, and picks the first rank
whose error is a cause. Both backends end a failed run with that rank's error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from worker.config import PROG

# torchrun --tee's per-process prefix, and torch's own prefix of a distributed error.
_PROCESS_PREFIX = re.compile(r"^\[default(\d+)\]:")
_TORCH_RANK_PREFIX = re.compile(r"^\[rank\d+\]: ?")
_TRACEBACK = "Traceback (most recent call last):"
# The worker's one-line refusal of a bad input ("python -m worker: error: ..."), and its log
# format at ERROR ("<time> [rank N] ERROR worker: message").
_LOGGED_ERROR = re.compile(rf"^{re.escape(PROG)}: error: |\] (ERROR|CRITICAL) ")
# What a rank prints when a peer died first: lost connections, aborted collectives, store
# timeouts, torchrun's own summary and the signal that stopped it.
_ECHO = re.compile(
    "|".join(
        [
            r"Connection closed by peer",
            r"Connection reset by peer",
            r"Broken pipe",
            r"NCCL communicator was aborted",
            r"remote process exited",
            r"ProcessGroupNCCL's watchdog",
            r"Watchdog caught collective operation timeout",
            r"DistBackendError",
            r"DistNetworkError",
            r"DistStoreError",
            r"TCPStore",
            r"recvValue",
            r"failed to recv",
            r"Socket Timeout",
            r"ChildFailedError",
            r"SignalException",
            r"Received Signals\.SIG",
            r"RendezvousClosedError",
            r"KeyboardInterrupt",
        ]
    )
)
EXCERPT_LINES = 25


@dataclass(frozen=True)
class ProcessError:
    """The error one process printed.

    Attributes:
        process: Which process: its local rank from the ``[default<n>]:`` prefix, or "" when
            the log had no prefixes (a lone process).
        cause: The one line that says what went wrong (an exception line or a logged error),
            without prefixes.
        excerpt: The lines to show for it, as printed: its traceback (bounded) or its error line.
        first_line: Index of its first error line in the log, to order processes by time.
        echo: Whether the error is the echo of another process's death.
    """

    process: str
    cause: str
    excerpt: tuple[str, ...]
    first_line: int
    echo: bool


def _split_processes(lines: Sequence[str]) -> dict[str, list[tuple[int, str]]]:
    """Each process's lines with their index in the log; "" for lines of no process."""
    processes: dict[str, list[tuple[int, str]]] = {}
    for index, line in enumerate(lines):
        match = _PROCESS_PREFIX.match(line)
        processes.setdefault(match.group(1) if match else "", []).append((index, line))
    return processes


def _body(line: str) -> str:
    """The line without the process and torch rank prefixes (indentation kept)."""
    return _TORCH_RANK_PREFIX.sub("", _PROCESS_PREFIX.sub("", line, count=1), count=1)


def _errors_of(process: str, lines: list[tuple[int, str]]) -> list[ProcessError]:
    """Every error one process printed, in order: logged errors and traceback exceptions."""
    errors: list[ProcessError] = []
    i = 0
    while i < len(lines):
        index, line = lines[i]
        text = _body(line).strip()
        if text == _TRACEBACK:
            # Indented lines are the frames; the first line after them is the exception.
            end = i + 1
            while end < len(lines) and _body(lines[end][1]).startswith((" ", "\t")):
                end += 1
            if end < len(lines) and _body(lines[end][1]).strip():
                cause = _body(lines[end][1]).strip()
                block = [raw for _, raw in lines[i : end + 1]]
                if len(block) > EXCERPT_LINES:
                    block = [block[0], "  ...", *block[-(EXCERPT_LINES - 2) :]]
                errors.append(ProcessError(process, cause, tuple(block), index, bool(_ECHO.search(cause))))
            i = end + 1
            continue
        if _LOGGED_ERROR.search(text):
            errors.append(ProcessError(process, text, (line,), index, bool(_ECHO.search(text))))
        i += 1
    return errors


def process_errors(lines: Sequence[str]) -> list[ProcessError]:
    """Each process's error (a cause where it printed one, else its last echo), in time order.

    Args:
        lines: One log: a local torchrun run or one pod's container log.
    """
    found = []
    for process, own in _split_processes(lines).items():
        errors = _errors_of(process, own)
        if not errors:
            continue
        causes = [e for e in errors if not e.echo]
        found.append(causes[0] if causes else errors[-1])
    return sorted(found, key=lambda e: e.first_line)


def first_cause(errors: Iterable[ProcessError]) -> ProcessError | None:
    """The first error that is not an echo, else the first error; None when there is none."""
    errors = list(errors)
    return next((e for e in errors if not e.echo), errors[0] if errors else None)
