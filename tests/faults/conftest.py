"""Fixtures of the fault suite."""

from __future__ import annotations

import pytest

from tests.faults.kill_resume import ELASTIC


@pytest.fixture(scope="session")
def elastic_source(tmp_path_factory, importance_run, data_overrides):
    """A short train-elastic run (in-process) for QAD to quantize."""
    from megatron_ext.config.compose import compose_recipe
    from recipes import train_elastic

    run_dir = tmp_path_factory.mktemp("elastic_for_qad_faults")
    overrides = [f"source.dir={importance_run}", f"run.dir={run_dir}", *ELASTIC, *data_overrides]
    train_elastic.run(compose_recipe("train_elastic", overrides))
    return run_dir
