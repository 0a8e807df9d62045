"""The ``local`` backend: run the worker on this machine under real torchrun.

K processes (CPU or the local GPUs) rendezvous through torchrun's standalone c10d
store, exactly as the ranks of one PyTorchJob node do, so the local run exercises
the same distributed code path as the cluster. K == 1 skips torchrun: a lone
process needs no process group.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from components.launch.failures import first_cause, process_errors

# The project root, so the worker's processes import `worker` whatever the caller's cwd
# (kfp.local and notebooks start components from wherever they happen to be).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
TAIL_LINES = 40
KEPT_LINES = 2000  # per process: enough for its traceback even after its peers' echoes
# torchrun's --tee prefix, and its log line for each rank that exited non-zero.
_RANK_LINE = re.compile(r"^\[default(\d+)\]:")
_RANK_FAILED = re.compile(r"failed \(exitcode: -?\d+\) local_rank: \d+")


class LocalRunError(RuntimeError):
    """The worker exited non-zero (or ran out of time); carries its exit code and log tail."""

    def __init__(
        self, returncode: int, tail: Sequence[str], *, cause: str | None = None, timed_out: bool = False
    ):
        self.returncode = returncode
        self.tail = list(tail)
        self.cause = cause
        self.timed_out = timed_out
        what = "timed out and was killed" if timed_out else f"failed with exit code {returncode}"
        # The cause opens the message (where a UI shows one line) and ends it (where a log shows the end).
        head = f"the local worker {what}: {cause}" if cause else f"the local worker {what}; last log lines:"
        super().__init__("\n".join([head, *self.tail]))


def _print_line(line: str) -> None:
    # Flush each line: under kfp.local or a KFP pod stdout is a pipe, and block
    # buffering would hold the worker's progress back until it exits.
    print(line, flush=True)


def worker_command(worker_args: Sequence[str], nproc: int, log_dir: str | None = None) -> list[str]:
    """The command line that runs the worker with ``nproc`` local processes.

    Under torchrun every rank's output is teed to the console prefixed ``[default<rank>]:``,
    so interleaved ranks stay readable and a failure can be traced to its rank.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    if nproc == 1:
        return [sys.executable, "-m", "worker", *worker_args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--tee=3",
        *([f"--log-dir={log_dir}"] if log_dir else []),
        "-m",
        "worker",
        *worker_args,
    ]


def pythonpath_with_project(pythonpath: str | None) -> str:
    """``pythonpath`` with the project root first, so child interpreters import its packages."""
    paths = [str(PROJECT_ROOT)] + [p for p in (pythonpath or "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(paths))


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath_with_project(env.get("PYTHONPATH"))
    env["PYTHONUNBUFFERED"] = "1"  # live logs from every rank, not at exit
    return env


class _Tails:
    """The last lines of each process (and of torchrun itself), in the order they were printed."""

    def __init__(self) -> None:
        self._count = 0
        self._lines: dict[str, collections.deque[tuple[int, str]]] = {}

    def add(self, line: str) -> None:
        match = _RANK_LINE.match(line)
        process = match.group(1) if match else ""
        self._lines.setdefault(process, collections.deque(maxlen=KEPT_LINES)).append((self._count, line))
        self._count += 1

    def lines(self) -> list[str]:
        return [line for _, line in sorted(entry for kept in self._lines.values() for entry in kept)]

    def explain(self) -> tuple[str | None, list[str]]:
        """The first failing rank's error, and lines ending with it; else every rank's last lines.

        torchrun's "first observed failure" is a race: a rank that hit the real error often
        exits after the peers it left hanging in a collective, so the cause is told from its
        echoes by what each rank printed.
        """
        lines = self.lines()
        errors = process_errors(lines)
        if any(e.process for e in errors):  # torchrun's own traceback only echoes its ranks'
            errors = [e for e in errors if e.process]
        first = first_cause(errors)
        if first is not None:
            who = f"rank {first.process}" if first.process else "the worker"
            echoes = [f"rank {e.process} failed too: {e.cause}" for e in errors if e is not first]
            excerpt = [f"--- {who} ---", *first.excerpt] if len(first.excerpt) > 1 else []
            return f"{who} failed first: {first.cause}", [
                *echoes,
                f"{who} failed first: {first.cause}",
                *excerpt,
            ]
        processes = [p for p in self._lines if p]
        if not processes:  # a lone process: everything it printed is "launcher" output
            return None, lines[-TAIL_LINES:]
        per_process = max(5, TAIL_LINES // len(processes))
        tails = [line for p in sorted(processes, key=int) for _, line in list(self._lines[p])[-per_process:]]
        return None, tails + [line for _, line in self._lines.get("", ()) if _RANK_FAILED.search(line)]


def run_local(
    worker_args: Sequence[str],
    nproc: int,
    *,
    log: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
) -> None:
    """Run the worker locally and stream its output, line by line, into ``log``.

    Args:
        worker_args: The worker's command-line arguments (``WorkerConfig.to_args()``).
        nproc: Processes to start; more than one runs under
            ``torchrun --standalone --nproc_per_node=nproc``.
        log: Called with every line the worker and torchrun print (stdout and stderr merged);
            default: print it.
        timeout_s: Kill the whole process tree after this many seconds; None waits forever.

    Raises:
        LocalRunError: The worker exited non-zero or timed out; the message carries the
            exit code and the last lines of every rank's log.
    """
    log = log or _print_line
    tails = _Tails()
    # torchrun's per-rank log files go to a folder we remove, not to a new /tmp/torchelastic_* per run.
    with tempfile.TemporaryDirectory(prefix="batch-inference-torchrun-") as log_dir:
        command = worker_command(worker_args, nproc, log_dir)
        log("$ " + " ".join(command))
        # A session of its own, so a timeout or an interrupt ends torchrun and all its ranks at once.
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            env=_environment(),
            start_new_session=True,
        )
        timed_out = threading.Event()

        def kill_tree() -> None:
            timed_out.set()
            _kill_group(proc)

        timer = threading.Timer(timeout_s, kill_tree) if timeout_s else None
        try:
            if timer:
                timer.start()
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tails.add(line)
                log(line)
            returncode = proc.wait()
        finally:
            if timer:
                timer.cancel()
            if proc.poll() is None:  # interrupted while streaming: leave no orphaned ranks behind
                _kill_group(proc)
                proc.wait()
    if returncode != 0 or timed_out.is_set():
        cause, lines = tails.explain()
        raise LocalRunError(returncode, lines, cause=cause, timed_out=timed_out.is_set())


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
