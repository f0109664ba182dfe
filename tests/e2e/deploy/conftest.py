"""One lab installed from deploy/ (`clustermesh lab up`, 2 nodes per cluster) for the whole package, with
three clusters that mix the two modes: lab-1 and lab-2 with the store pods' cache (the default), lab-3
in direct mode (`--direct lab-3`). test_manifests.py uses it as users do, then test_store_chaos.py
breaks lab-2's store tier under clients of both modes at once, then test_teardown.py takes it down and
checks that nothing is left. One lab instead of one per module and mode keeps the test command within
its time budget."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.test_lab import Lab, open_lab


@pytest.fixture(scope="package")
def deploy_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("deploy") / "lab", 3, 2, "--direct", "lab-3") as lab:
        yield lab
