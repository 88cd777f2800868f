"""CheckpointManager: atomic save, verification, fallback, pruning, exact resume (world of one)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ext.checkpoint import CheckpointError, CheckpointManager
from megatron_ext.models.builder import build_model, causal_mask
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, init_distributed, set_seed

SEQ = 32


@pytest.fixture(scope="module")
def pgs():
    # init_distributed re-uses a default process group another test module may have created.
    return init_distributed(ParallelConfig())


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    data = torch.tensor(list(Path(os.__file__).read_bytes()[: 2 * (SEQ + 1)]))
    data = data.view(2, SEQ + 1)
    return {
        "tokens": data[:, :-1],
        "labels": data[:, 1:],
        "position_ids": torch.arange(SEQ)[None].expand(2, SEQ),
    }


def make(pgs, seed: int):
    set_seed(seed)
    model = build_model(HybridModelConfig(), ParallelConfig(), pgs)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def loss_of(model, batch) -> torch.Tensor:
    mask = causal_mask(SEQ)
    return model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"]).mean()


def train_step(model, optimizer, batch) -> float:
    optimizer.zero_grad()
    loss = loss_of(model, batch)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@pytest.fixture(scope="module")
def trained(pgs, batch):
    """A model and optimizer after one step, so the optimizer state is not empty."""
    model, optimizer = make(pgs, seed=1)
    train_step(model, optimizer, batch)
    return model, optimizer


def save_steps(root: Path, pgs, trained, steps, keep: int = 3) -> CheckpointManager:
    manager = CheckpointManager(root, pgs, keep=keep)
    model, optimizer = trained
    for step in steps:
        manager.save(step, model, optimizer, {"step": step, "note": f"at {step}"})
    return manager


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_save_then_load_restores_identical_weights_optimizer_extra_and_loss(tmp_path, pgs, batch):
    model, optimizer = make(pgs, seed=1)
    train_step(model, optimizer, batch)
    manager = save_steps(tmp_path, pgs, (model, optimizer), [1])
    fresh, fresh_opt = make(pgs, seed=2)
    embedding = "embedding.word_embeddings.weight"
    assert not torch.equal(fresh.state_dict()[embedding], model.state_dict()[embedding])

    extra = manager.load(manager.latest_valid(), fresh, fresh_opt)

    assert extra == {"step": 1, "note": "at 1"}
    assert_same_state(model.state_dict(), fresh.state_dict())
    assert_same_state(optimizer.state_dict(), fresh_opt.state_dict())
    with torch.no_grad():
        assert torch.equal(loss_of(model, batch), loss_of(fresh, batch))
    # training continues bit-identically from the restored optimizer state
    assert train_step(model, optimizer, batch) == train_step(fresh, fresh_opt, batch)
    assert_same_state(model.state_dict(), fresh.state_dict())
    assert_same_state(optimizer.state_dict(), fresh_opt.state_dict())


def test_checkpoint_layout_manifest_and_latest_txt(tmp_path, pgs, trained):
    manager = save_steps(tmp_path, pgs, trained, [7])
    path = tmp_path / "iter_0000007"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["step"] == 7
    assert manifest["layout"] == {"world_size": 1, "tp": 1, "ep": 1, "pp": 1, "dp": 1}
    assert "rank_state/rank_00000.pt" in manifest["files"]
    assert any(name.endswith(".distcp") for name in manifest["files"])
    for rel, size in manifest["files"].items():
        assert (path / rel).stat().st_size == size
    assert (tmp_path / "latest.txt").read_text().strip() == "iter_0000007"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000007", "latest.txt"]
    assert manager.latest_valid() == path


def test_truncated_distcp_is_detected_and_latest_valid_falls_back(tmp_path, pgs, trained, caplog):
    manager = save_steps(tmp_path, pgs, trained, [1, 2])
    bad = tmp_path / "iter_0000002"
    distcp = next(bad.glob("*.distcp"))
    with open(distcp, "r+b") as f:
        f.truncate(distcp.stat().st_size // 2)

    model, optimizer = make(pgs, seed=3)
    with pytest.raises(CheckpointError, match=str(bad)) as err:
        manager.load(bad, model, optimizer)
    assert distcp.name in str(err.value)

    with caplog.at_level(logging.WARNING, logger="megatron_ext.checkpoint"):
        assert manager.latest_valid() == tmp_path / "iter_0000001"
    assert any(str(bad) in r.getMessage() and distcp.name in r.getMessage() for r in caplog.records)
    assert manager.load(manager.latest_valid(), model, optimizer)["step"] == 1


def test_missing_manifest_is_detected_and_latest_valid_falls_back(tmp_path, pgs, trained, caplog):
    manager = save_steps(tmp_path, pgs, trained, [1, 2])
    bad = tmp_path / "iter_0000002"
    (bad / "manifest.json").unlink()

    with pytest.raises(CheckpointError, match=f"{bad}.*manifest.json is missing"):
        manager.verify(bad)
    with caplog.at_level(logging.WARNING, logger="megatron_ext.checkpoint"):
        assert manager.latest_valid() == tmp_path / "iter_0000001"
    assert any(str(bad) in r.getMessage() for r in caplog.records)


def test_missing_rank_state_file_is_detected(tmp_path, pgs, trained):
    manager = save_steps(tmp_path, pgs, trained, [1])
    bad = tmp_path / "iter_0000001"
    (bad / "rank_state" / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match=f"{bad}.*rank_00000.pt is missing"):
        manager.verify(bad)
    assert manager.latest_valid() is None


def test_leftover_temporary_dir_is_ignored_and_kept_aside_by_next_save(tmp_path, pgs, trained):
    manager = save_steps(tmp_path, pgs, trained, [1])
    # what a save of step 5 that crashed before its rename leaves behind
    leftover = tmp_path / ".tmp_iter_0000005"
    shutil.copytree(tmp_path / "iter_0000001", leftover)

    assert manager.latest_valid() == tmp_path / "iter_0000001"
    with pytest.raises(CheckpointError, match=f"{leftover}.*temporary"):
        manager.verify(leftover)
    manager.save(2, *trained, {"step": 2})
    assert not leftover.exists()
    assert len(list(tmp_path.glob("iter_0000005.partial-*"))) == 1  # renamed, never deleted
    assert manager.latest_valid() == tmp_path / "iter_0000002"


def test_pruning_keeps_the_newest_keep_checkpoints(tmp_path, pgs, trained):
    manager = save_steps(tmp_path, pgs, trained, [1, 2, 3, 4, 5], keep=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000004", "iter_0000005"]
    assert manager.latest_valid() == tmp_path / "iter_0000005"


def test_layout_change_loads_weights_only_and_says_resharded(tmp_path, pgs, trained, caplog):
    manager = save_steps(tmp_path, pgs, trained, [1])
    path = tmp_path / "iter_0000001"
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["layout"] = {"world_size": 2, "tp": 2, "ep": 1, "dp": 1}  # as if saved at TP=2
    manifest_path.write_text(json.dumps(manifest))

    model, optimizer = make(pgs, seed=4)
    with caplog.at_level(logging.WARNING, logger="megatron_ext.checkpoint"):
        assert manager.load(path, model, optimizer) == {"resharded": True}
    assert any("layout" in r.getMessage() for r in caplog.records)
    assert_same_state(trained[0].state_dict(), model.state_dict())
    assert optimizer.state_dict()["state"] == {}  # untouched


def test_weights_only_load_leaves_optimizer_untouched(tmp_path, pgs, trained):
    manager = save_steps(tmp_path, pgs, trained, [1])
    model, optimizer = make(pgs, seed=5)
    assert manager.load(tmp_path / "iter_0000001", model, optimizer, weights_only=True) == {}
    assert_same_state(trained[0].state_dict(), model.state_dict())
    assert optimizer.state_dict()["state"] == {}


def test_weights_of_another_model_shape_raise_checkpoint_error(tmp_path, pgs, trained):
    manager = save_steps(tmp_path, pgs, trained, [1])
    set_seed(6)
    other = build_model(
        HybridModelConfig(
            hidden_size=64, num_attention_heads=2, num_query_groups=1, mamba_num_heads=4
        ),
        ParallelConfig(),
        pgs,
    )
    with pytest.raises(CheckpointError, match="iter_0000001"):
        manager.load(tmp_path / "iter_0000001", other)


def test_no_checkpoint_gives_none(tmp_path, pgs):
    assert CheckpointManager(tmp_path / "absent", pgs).latest_valid() is None
