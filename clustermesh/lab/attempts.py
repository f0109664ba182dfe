"""A strict client for chaos runs: every attempt recorded, every loss counted.

x-wing asks a Service in an endless shell loop that prints one line per attempt:

    <start, epoch ns> <curl's exit code> <curl's answer, newlines removed>

``judge`` (pure) turns those attempts into a ``Verdict``. A failure is an error exit, an answer
that is not rebel-base's JSON, an answer from a cluster that should not answer, and any gap of
more than ``max_gap`` seconds between two attempts' starts, including before the first and after
the last one when the window's edges are given: a stalled or dead loop answers nothing, and that
must count as much as an error does.

Attempt times come from ``date`` inside the pod. Lab pods run host programs, so that is this
machine's wall clock: compare them with ``time.time()``, never ``time.monotonic()``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

EXPECT = frozenset({"Cluster-2"})


@dataclass(frozen=True)
class Attempt:
    t: float  # when the attempt started, seconds since the epoch (the pod's wall clock)
    exit_code: int  # curl's
    answer: str  # curl's output on one line


@dataclass(frozen=True)
class Failure:
    t: float  # the failed attempt's start, or where the gap began
    why: str
    attempt: Attempt | None = None  # None for a gap that ends at the window's end


@dataclass(frozen=True)
class Verdict:
    attempts: int
    failures: int
    failed: tuple[Failure, ...]
    largest_gap: float
    first: float | None  # start of the first judged attempt
    last: float | None

    def describe(self) -> str:
        span = 0.0 if self.first is None or self.last is None else self.last - self.first
        line = (f"{self.attempts} attempts over {span:.1f}s, {self.failures} failures, "
                f"largest gap {self.largest_gap:.2f}s")
        if self.failed:
            origin = self.first if self.first is not None else self.failed[0].t
            shown = "; ".join(f"+{f.t - origin:.2f}s {f.why}" for f in self.failed[:3])
            more = f" (and {self.failures - 3} more)" if self.failures > 3 else ""
            line += f": {shown}{more}"
        return line


def attempt_script(target: str = "rebel-base", pause: float = 0.05, max_time: float = 1.0) -> str:
    """The POSIX sh loop run inside x-wing."""
    # `a=$(curl ...); rc=$?` is curl's own status: an assignment's status is that of its command
    # substitution, while `$?` after `curl | tr` would be tr's. Newlines go in a second step.
    return (
        "while :; do "
        "t=$(date +%s%N); "
        f"a=$(curl -s --max-time {max_time:g} {shlex.quote(target)}); rc=$?; "
        "a=$(printf '%s' \"$a\" | tr -d '\\r\\n'); "
        "printf '%s %s %s\\n' \"$t\" \"$rc\" \"$a\"; "
        f"sleep {pause:g}; "
        "done"
    )


def attempt_command(kubeconfig: str, context: str, target: str = "rebel-base", pause: float = 0.05) -> list[str]:
    """kubectl exec into x-wing running ``attempt_script``: a new connection per attempt."""
    return ["kubectl", "--kubeconfig", kubeconfig, "--context", context, "exec", "deploy/x-wing", "--",
            "sh", "-c", attempt_script(target, pause)]


def parse_attempt(line: str) -> Attempt | None:
    """One line of the loop's output; None for a blank line or one the loop cannot have printed."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    parts = line.split(" ", 2)
    if len(parts) < 2:
        return None
    try:
        ns, code = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    # int / int divides exactly before rounding; a float of the nanoseconds would lose ~100 ns.
    return Attempt(t=ns / 1_000_000_000, exit_code=code, answer=parts[2] if len(parts) == 3 else "")


def answer_problem(answer: str, expect: Collection[str]) -> str | None:
    """Why a successful curl's answer still counts as a failure, or None."""
    try:
        body = json.loads(answer)
    except ValueError:
        return f"not JSON: {answer[:80]!r}"
    cluster = body.get("Cluster") if isinstance(body, dict) else None
    if not isinstance(cluster, str):
        return f"no Cluster in {answer[:80]!r}"
    if cluster not in expect:
        return f"answered by {cluster}"
    return None


def judge(attempts: Iterable[Attempt], expect: Collection[str] = EXPECT, max_gap: float = 1.0,
          start: float | None = None, end: float | None = None) -> Verdict:
    """Count what was lost among the attempts that started within [start, end] (either open)."""
    judged = sorted((a for a in attempts
                     if (start is None or a.t >= start) and (end is None or a.t <= end)), key=lambda a: a.t)
    failed: list[Failure] = []
    for a in judged:
        why = f"curl exit {a.exit_code}" if a.exit_code != 0 else answer_problem(a.answer, expect)
        if why is not None:
            failed.append(Failure(a.t, why, a))
    # The window's edges are points too: no attempt for a while after `start` or before `end` is a
    # stall, whether or not the attempts around it succeeded.
    points: list[tuple[float, Attempt | None]] = [(a.t, a) for a in judged]
    if start is not None:
        points.insert(0, (start, None))
    if end is not None:
        points.append((end, None))
    largest = 0.0
    for (t0, _), (t1, after) in itertools.pairwise(points):
        gap = t1 - t0
        largest = max(largest, gap)
        if gap > max_gap:
            failed.append(Failure(t0, f"no attempt for {gap:.2f}s", after))
    failed.sort(key=lambda f: f.t)
    return Verdict(attempts=len(judged), failures=len(failed), failed=tuple(failed), largest_gap=largest,
                   first=judged[0].t if judged else None, last=judged[-1].t if judged else None)


class LoopEnded(RuntimeError):
    """The loop's process exited while someone waited for its attempts."""


class AttemptLoop:
    """The loop running in the background (its own session), its attempts parsed as they come.

    Lines that are not attempts (and stderr) are kept in ``garbled``/``errors`` and, with ``raw``,
    every line goes to that file as it arrives, for reading after a failed run.
    """

    def __init__(self, command: Sequence[str], raw: Path | None = None) -> None:
        self.command = list(command)
        self._cond = threading.Condition()
        self._attempts: list[Attempt] = []
        self.garbled: list[str] = []
        self.errors: list[str] = []
        self._raw: IO[str] | None = raw.open("a") if raw is not None else None
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, False), name="attempts-out", daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, True), name="attempts-err", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @classmethod
    def in_xwing(cls, kubeconfig: str, context: str, target: str = "rebel-base", pause: float = 0.05,
                 raw: Path | None = None) -> AttemptLoop:
        return cls(attempt_command(kubeconfig, context, target, pause), raw)

    def _read(self, stream: IO[str], is_stderr: bool) -> None:
        for line in stream:
            with self._cond:
                if self._raw is not None:
                    self._raw.write(f"! {line}" if is_stderr else line)
                    self._raw.flush()
                if is_stderr:
                    self.errors.append(line.rstrip("\n"))
                    continue
                if not line.endswith("\n"):
                    continue  # cut short by the stop: its answer is not all of curl's (kept in raw only)
                attempt = parse_attempt(line)
                if attempt is not None:
                    self._attempts.append(attempt)
                    self._cond.notify_all()
                elif line.strip():
                    self.garbled.append(line.rstrip("\n"))
        with self._cond:
            self._cond.notify_all()  # a waiter learns the loop has ended

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def attempts(self) -> list[Attempt]:
        with self._cond:
            return list(self._attempts)

    def attempts_since(self, t: float) -> list[Attempt]:
        """Attempts that started at or after wall time ``t``."""
        with self._cond:
            return [a for a in self._attempts if a.t >= t]

    def wait_for(self, predicate: Callable[[list[Attempt]], bool], timeout: float, what: str = "a condition") -> None:
        """Until ``predicate(all attempts so far)`` holds; it is asked again at least every 0.2 s, so it
        may depend on the time. Raises TimeoutError, or LoopEnded when the loop's process is gone."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self._attempts)):
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads):
                    raise LoopEnded(f"the attempt loop exited ({self.proc.returncode}) before {what}; "
                                    f"stderr: {self.errors[-5:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} not within {timeout:.0f}s; last attempts: {self._attempts[-3:]}, "
                                       f"stderr: {self.errors[-5:]}")
                self._cond.wait(min(left, 0.2))

    def wait_clean(self, expect: Collection[str] = EXPECT, seconds: float = 3.0, max_gap: float = 1.0,
                   timeout: float = 90.0) -> float:
        """Until the last ``seconds`` of attempts, up to now, are all clean; returns the start of the
        first attempt in that clean window (wall time), a safe start for judging what follows (the
        time before the loop's first attempt is not a stall of the mesh)."""
        since = 0.0

        def clean(attempts: list[Attempt]) -> bool:
            nonlocal since
            now = time.time()
            verdict = judge(attempts, expect, max_gap, start=now - seconds, end=now)
            if verdict.attempts == 0 or verdict.failures:
                return False
            assert verdict.first is not None
            since = verdict.first
            return True

        self.wait_for(clean, timeout, f"{seconds:.0f}s of clean answers from {sorted(expect)}")
        return since

    def wait_past(self, t: float, timeout: float = 5.0) -> None:
        """Until an attempt that started at or after ``t`` is in: what was asked until ``t`` has been
        reported, so judging up to ``t`` does not mistake output still on its way for a stall."""
        self.wait_for(lambda attempts: any(a.t >= t for a in attempts), timeout, "an attempt after the end")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the loop's process group (kubectl; the lab's exec server then kills the pod's
        side), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(timeout)
        with self._cond:
            if self._raw is not None:
                self._raw.close()
                self._raw = None

    def __enter__(self) -> AttemptLoop:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
