"""The strict chaos client (``clustermesh.lab.attempts``): what a line says, what counts as lost.

Each rule of ``judge`` has a row that only that rule fails, so dropping the rule fails the row.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from clustermesh.lab.attempts import (
    Attempt,
    AttemptLoop,
    LoopEnded,
    attempt_command,
    attempt_script,
    judge,
    parse_attempt,
)

OK = '{"Galaxy": "Alderaan", "Cluster": "Cluster-2"}'
T0 = 1_700_000_000.0


def run(*rows: tuple[float, int, str]) -> list[Attempt]:
    """Attempts at T0 + offset."""
    return [Attempt(T0 + dt, code, answer) for dt, code, answer in rows]


def steady(until: float, every: float = 0.1, answer: str = OK) -> list[tuple[float, int, str]]:
    return [(round(i * every, 6), 0, answer) for i in range(round(until / every) + 1)]


# ---------------------------------------------------------------- parse


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", None),
        ("\n", None),
        ("   \r\n", None),
        (f"1700000000123456789 0 {OK}\n", Attempt(1_700_000_000.123456789, 0, OK)),
        ("1700000000000000000 7 \n", Attempt(1_700_000_000.0, 7, "")),  # curl printed nothing
        ("1700000000000000000 7\n", Attempt(1_700_000_000.0, 7, "")),
        ("1700000000000000000 0 <html> 502  Bad Gateway </html>\n",
         Attempt(1_700_000_000.0, 0, "<html> 502  Bad Gateway </html>")),  # the answer's spaces are kept
        ("error: unable to upgrade connection\n", None),
        ("1700000000000000000\n", None),
        ("N 0 {}\n", None),  # a date without %N support
        ("1700000000000000000 x {}\n", None),
    ],
)
def test_parse_attempt(line: str, expected: Attempt | None) -> None:
    assert parse_attempt(line) == expected


def test_parse_keeps_the_nanoseconds_of_a_recent_date() -> None:
    attempt = parse_attempt("1796232724000534371 0 {}")
    assert attempt is not None
    assert abs(attempt.t - 1_796_232_724.000534371) < 1e-6


# ---------------------------------------------------------------- judge


@pytest.mark.parametrize(
    ("name", "attempts", "window", "whys"),
    [
        ("clean run", run(*steady(3.0)), (T0, T0 + 3.0), []),
        # A full answer with an error exit (curl 28 after the body, say) is still an error.
        ("exit code", run(*steady(1.0), (1.1, 28, OK), *[(1.2 + r[0], 0, OK) for r in steady(1.0)]),
         (None, None), ["curl exit 28"]),
        ("not JSON", run((0.0, 0, OK), (0.1, 0, "<html>502 Bad Gateway</html>"), (0.2, 0, OK)),
         (None, None), ["not JSON"]),
        ("JSON without Cluster", run((0.0, 0, OK), (0.1, 0, '{"Galaxy": "Alderaan"}'), (0.2, 0, OK)),
         (None, None), ["no Cluster"]),
        ("JSON that is not an object", run((0.0, 0, OK), (0.1, 0, '["Cluster-2"]'), (0.2, 0, OK)),
         (None, None), ["no Cluster"]),
        ("wrong cluster", run((0.0, 0, OK), (0.1, 0, OK.replace("Cluster-2", "Cluster-1")), (0.2, 0, OK)),
         (None, None), ["answered by Cluster-1"]),
        ("gap in the middle", run((0.0, 0, OK), (0.1, 0, OK), (1.5, 0, OK), (1.6, 0, OK)),
         (None, None), ["no attempt for 1.40s"]),
        ("stall at the end", run(*steady(1.0)), (T0, T0 + 3.0), ["no attempt for 2.00s"]),
        ("stall at the start", run(*[(2.0 + r[0], 0, OK) for r in steady(1.0)]), (T0, T0 + 3.0),
         ["no attempt for 2.00s"]),
        ("no attempt at all", [], (T0, T0 + 3.0), ["no attempt for 3.00s"]),
        # Outside the window: the failure before start is not this window's, nor the gap after end.
        ("judged window only", run((-5.0, 7, ""), *steady(1.0), (4.0, 0, "nope")), (T0, T0 + 1.0), []),
    ],
)
def test_judge(name: str, attempts: list[Attempt], window: tuple[float | None, float | None],
               whys: list[str]) -> None:
    start, end = window
    verdict = judge(attempts, {"Cluster-2"}, 1.0, start, end)
    assert verdict.failures == len(verdict.failed) == len(whys), (name, verdict.describe())
    for failure, why in zip(verdict.failed, whys, strict=True):
        assert failure.why.startswith(why), (name, failure)


def test_a_gap_of_exactly_max_gap_is_not_a_failure() -> None:
    verdict = judge(run((0.0, 0, OK), (1.0, 0, OK)), max_gap=1.0)
    assert verdict.failures == 0 and verdict.largest_gap == pytest.approx(1.0)


def test_a_failed_attempt_after_a_gap_counts_twice() -> None:
    verdict = judge(run((0.0, 0, OK), (2.0, 7, "")))
    assert [f.why.split(" ")[0] for f in verdict.failed] == ["no", "curl"]
    assert verdict.failed[0].attempt == verdict.failed[1].attempt == Attempt(T0 + 2.0, 7, "")


def test_verdict_figures() -> None:
    attempts = run((0.3, 0, OK), (0.0, 0, OK), (0.1, 0, OK), (0.9, 0, OK))  # out of order on purpose
    verdict = judge(attempts, start=T0 - 0.2, end=T0 + 1.0)
    assert (verdict.attempts, verdict.failures) == (4, 0)
    assert verdict.largest_gap == pytest.approx(0.6)
    assert verdict.first == T0 and verdict.last == T0 + 0.9
    assert verdict.describe() == "4 attempts over 0.9s, 0 failures, largest gap 0.60s"
    failing = judge(run((0.0, 0, OK), (0.1, 0, "x")), expect={"Cluster-2"})
    assert failing.describe().endswith("1 failures, largest gap 0.10s: +0.10s not JSON: 'x'")


# ---------------------------------------------------------------- the loop's script and runner


def test_the_command_execs_the_script_in_x_wing() -> None:
    argv = attempt_command("/k", "lab-1", "rebel-base", 0.05)
    assert argv[:8] == ["kubectl", "--kubeconfig", "/k", "--context", "lab-1", "exec", "deploy/x-wing", "--"]
    assert argv[8:] == ["sh", "-c", attempt_script("rebel-base", 0.05)]


FAKE_CURL = """#!/bin/sh
n=$(cat "$STATE" 2>/dev/null || echo 0); echo $((n + 1)) > "$STATE"
case $n in
  0) printf '{"Galaxy": "Alderaan",\\n "Cluster": "Cluster-2"}\\n' ;;
  1) exit 7 ;;
  *) printf '{"Cluster": "Cluster-2"}'; exit 28 ;;
esac
"""


@pytest.fixture
def fake_curl(tmp_path: Path) -> dict[str, str]:
    """A `curl` on PATH: a two-line answer, then exit 7 with nothing, then exit 28 with a body."""
    (tmp_path / "curl").write_text(FAKE_CURL)
    (tmp_path / "curl").chmod(stat.S_IRWXU)
    return {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "STATE": str(tmp_path / "n")}


def test_the_script_reports_curls_own_exit_code_and_one_line_answers(fake_curl: dict[str, str]) -> None:
    """The host's sh runs the script as x-wing's does (lab pods run host programs)."""
    before = time.time()
    proc = subprocess.Popen(["sh", "-c", attempt_script("rebel-base", 0.01)], stdout=subprocess.PIPE,
                            text=True, env=fake_curl, start_new_session=True)
    assert proc.stdout is not None
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.kill()
        proc.wait()
    attempts = [parse_attempt(line) for line in lines]
    assert [(a.exit_code, a.answer) for a in attempts if a is not None] == [
        (0, '{"Galaxy": "Alderaan", "Cluster": "Cluster-2"}'), (7, ""), (28, '{"Cluster": "Cluster-2"}')]
    assert all(a is not None and before - 1 < a.t < time.time() for a in attempts), "wall-clock times"


def test_the_loop_collects_attempts_and_stops(tmp_path: Path) -> None:
    now_ns = time.time_ns()
    script = (f"printf '{now_ns} 0 {OK}\\n\\nnot an attempt\\n{now_ns + 10**8} 7 \\n'; echo oops >&2; "
              f"printf '{now_ns + 2 * 10**8} 0 cut short'; exec sleep 60")
    raw = tmp_path / "raw.log"
    with AttemptLoop(["sh", "-c", script], raw) as loop:
        loop.wait_for(lambda attempts: len(attempts) == 2, timeout=10, what="two attempts")
        loop.wait_for(lambda _: bool(loop.errors), timeout=10, what="stderr")
        assert loop.running
        assert [a.exit_code for a in loop.attempts_since(now_ns / 1e9 + 0.05)] == [7]
    assert not loop.running
    assert loop.garbled == ["not an attempt"]  # the unterminated last line is not an attempt either
    assert loop.errors == ["oops"]
    assert len(loop.attempts()) == 2
    assert "! oops\n" in raw.read_text() and "not an attempt\n" in raw.read_text()


def test_waiting_on_an_ended_loop_says_so() -> None:
    with AttemptLoop(["sh", "-c", "echo bye >&2; exit 3"]) as loop, pytest.raises(LoopEnded, match="bye"):
        loop.wait_for(lambda _: False, timeout=10, what="nothing")
