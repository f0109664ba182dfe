"""Last of the package: the lab installed from deploy/ goes down and leaves nothing behind."""

from __future__ import annotations

from tests.e2e.test_lab import Lab, leftovers


def test_teardown_leaves_nothing(deploy_lab: Lab) -> None:
    state = deploy_lab.state
    deploy_lab.stop()
    assert leftovers(state) == []
