"""One lab installed from deploy/ (the default `clustermesh lab up`: 2 clusters x 2 nodes) for the whole
package: test_manifests.py uses it as users do, then test_store_chaos.py breaks its store tier, then
test_teardown.py takes it down and checks that nothing is left. One lab instead of one per module
keeps the test command within its time budget."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.test_lab import Lab, open_lab


@pytest.fixture(scope="package")
def deploy_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("deploy") / "lab", 2, 2) as lab:
        yield lab
