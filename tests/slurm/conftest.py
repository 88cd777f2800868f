"""A one-node Slurm for the tests in this folder, started once per session under a tmp dir.

The tests skip (with the reason) when ``slurm-wlm``/``munge`` are not installed (``make test``
installs them through ``make slurm-deps`` when apt is available) or cannot start here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.slurm.cluster import SlurmCluster, SlurmUnavailable, start_cluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Iterator[SlurmCluster]:
    """The running cluster; its finalizer cancels our jobs and stops the daemons by PID."""
    root = tmp_path_factory.mktemp("slurm")
    try:
        cluster = start_cluster(root)
    except SlurmUnavailable as err:
        pytest.skip(f"no Slurm: {err}")
    yield cluster
    try:  # jobs outlive slurmd otherwise; only this private cluster's jobs are seen here
        cluster.run("scancel", "--user=root", check=False, timeout=20)
        for _ in range(40):
            if not cluster.run("squeue", "-h", check=False, timeout=10).strip():
                break
            time.sleep(0.5)
    finally:
        cluster.stop()
