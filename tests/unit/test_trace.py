"""Hop tracing (bench/hop_bench.py reads it): off by default, one file per process when on."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from clustermesh import trace


def test_tracing_is_off_without_the_variable_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(trace.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    off = importlib.reload(trace)
    assert not off.enabled()
    off.hop("k8s-event", "default/a")
    assert list(tmp_path.iterdir()) == []


def test_each_hop_is_a_line_with_the_time_and_the_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(trace.ENV, str(tmp_path))
    monkeypatch.setenv("NODE_NAME", "node-7")
    on = importlib.reload(trace)
    try:
        on.set_role("agent-node-7")
        on.hop("watch-event", on.service_ref("cilium/cache/services/v1/lab-2/default/rebel-base"))
        on.hops("map-write", iter(["default/a", "default/b"]))
        files = list(tmp_path.iterdir())
        assert [f.name for f in files] == [f"agent-node-7-node-7-{os.getpid()}.trace"]
        lines = [line.split(" ") for line in files[0].read_text().splitlines()]
        assert [(hop, ref) for _, hop, ref in lines] == [
            ("watch-event", "default/rebel-base"), ("map-write", "default/a"), ("map-write", "default/b")]
        times = [float(t) for t, _, _ in lines]
        assert times == sorted(times) and times[0] > 1.7e9  # wall clock: comparable across processes
    finally:
        monkeypatch.delenv(trace.ENV)
        importlib.reload(trace)
