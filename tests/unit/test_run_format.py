"""The run-directory format has one owner: one schema for ``elastic_layout.json`` whoever
writes it, atomic writes that leave no temporary file and no half-written target."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ext import run_format
from megatron_ext.elastic.controller import StripeLayout
from megatron_ext.elastic.reorder import layout_record


def test_stripe_layout_and_importance_record_share_one_schema(tmp_path):
    perms = {"ffn": {0: torch.tensor([1, 0, 2, 3])}}
    record = layout_record(perms, 2, 1, checkpoint="iter_0000000")
    record["layer_order"] = [1, 0]
    run_format.write_elastic_layout(tmp_path / "importance", record)
    # the stripe layout reads what the importance recipe wrote ...
    read = StripeLayout.load(tmp_path / "importance")
    assert (read.tp, read.ep, read.layer_order) == (2, 1, (1, 0))
    # ... and what it writes itself passes the same schema check and reads back equal
    StripeLayout(tp=2, ep=1, layer_order=(1, 0)).save(tmp_path / "elastic")
    written = run_format.read_elastic_layout(tmp_path / "elastic")
    assert {k: written[k] for k in ("tp", "ep", "layer_order")} == {
        k: record[k] for k in ("tp", "ep", "layer_order")
    }
    assert StripeLayout.load(tmp_path / "elastic") == read


@pytest.mark.parametrize("bad", [{"ep": 1}, {"tp": 0, "ep": 1}, {"tp": "2", "ep": 1}])
def test_elastic_layout_off_schema_is_refused_on_write_and_read(tmp_path, bad):
    with pytest.raises(ValueError, match="elastic_layout.json"):
        run_format.write_elastic_layout(tmp_path, bad)
    assert not run_format.has_elastic_layout(tmp_path)  # nothing was written
    (tmp_path / run_format.ELASTIC_LAYOUT).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="elastic_layout.json"):
        StripeLayout.load(tmp_path)


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "run" / run_format.SUMMARY
    run_format.write_summary(tmp_path / "run", {"loss": 1.0})
    run_format.write_summary(tmp_path / "run", {"loss": 0.5, "steps": 3})
    assert run_format.read_summary(tmp_path / "run") == {"loss": 0.5, "steps": 3}
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = run_format.write_json(tmp_path / run_format.BUDGET_CHOICES, {"L": {"ffn": 4}})
    with pytest.raises(TypeError):
        run_format.write_json(path, {"L": object()})  # not JSON: fails before the rename
    assert run_format.read_json(path) == {"L": {"ffn": 4}}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_config_and_torch_files_round_trip(tmp_path):
    run_format.save_config(tmp_path, {"run": {"dir": str(tmp_path)}, "x": "${run.dir}"})
    assert run_format.has_config(tmp_path)
    assert run_format.read_config(tmp_path).x == str(tmp_path)  # saved resolved
    scores = {"ffn": {0: torch.arange(3.0)}}
    run_format.save_torch(tmp_path / run_format.SCORES, scores)
    assert torch.equal(torch.load(tmp_path / run_format.SCORES)["ffn"][0], torch.arange(3.0))
    assert run_format.checkpoints_dir(tmp_path) == tmp_path / run_format.CHECKPOINTS
