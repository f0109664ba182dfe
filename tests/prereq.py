"""Prerequisite checks shared by the test tiers.

Integration and datapath tests are the ones that matter, so under CI=true a
missing prerequisite (root, a binary, BPF, a kernel feature) fails the test
instead of skipping it: a green CI must mean the real parts ran.
"""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(ok: bool, what: str, fix: str) -> None:
    """Fail (under CI) or skip (elsewhere) unless ``ok``; ``fix`` says what to run."""
    if ok:
        return
    message = f"missing prerequisite: {what}; {fix}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_root() -> None:
    require(os.geteuid() == 0, "root", "run the tests as root (scripts/test.sh)")


def require_binary(name: str, fix: str = "run scripts/setup.sh") -> str:
    path = shutil.which(name)
    require(path is not None, f"the {name!r} binary", fix)
    assert path is not None
    return path
