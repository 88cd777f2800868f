"""Bad corpora: every skipped file named with its reason, empty splits refused, missing dirs
reported as config errors naming ``data.source_dir``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megatron_ext.config.schema import DataConfig, TrainConfig
from megatron_ext.data.prepare import DataError, prepare_indexed_dataset
from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.models.config import ConfigError
from megatron_ext.parallel import ParallelConfig, init_distributed
from megatron_ext.training.data import build_batches
from recipes.cli import main


def _bad_files(root: Path) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.py").write_bytes(b"")
    (root / "elf.py").write_bytes(Path(sys.executable).resolve().read_bytes()[:4096])
    (root / "latin1.py").write_bytes("caf\u00e9 = 1\n".encode("latin-1"))
    return {"empty.py": "empty", "elf.py": "binary", "latin1.py": "not UTF-8"}


def test_every_skipped_file_is_named_with_its_reason(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    expected = _bad_files(corpus)
    source = Path(json.__file__).read_text()
    for i in range(8):  # enough good files that both splits get documents
        (corpus / f"good_{i}.py").write_text(source)
    meta_out = prepare_indexed_dataset(
        corpus, tmp_path / "out" / "ds", ByteTokenizer(), valid_fraction=0.4, progress=False
    )
    meta = json.loads((tmp_path / "out" / "ds_meta.json").read_text())
    assert meta["skipped_files"] == 3
    reasons = {s["file"]: s["reason"] for s in meta["skipped"]}
    assert reasons.keys() == expected.keys()
    for name, why in expected.items():
        assert reasons[name].startswith(why), reasons[name]
        assert any(name in r.getMessage() and why in r.getMessage() for r in caplog.records)
    assert meta_out["train_documents"] + meta_out["valid_documents"] == 8


def test_a_corpus_of_only_bad_files_is_refused_and_not_cached(tmp_path):
    corpus = tmp_path / "corpus"
    _bad_files(corpus)
    with pytest.raises(DataError, match="no documents.*3 files skipped"):
        prepare_indexed_dataset(corpus, tmp_path / "out" / "ds", ByteTokenizer(), progress=False)
    assert not (tmp_path / "out" / "ds_meta.json").exists()


def test_prepare_data_on_bad_files_exits_nonzero_with_one_line(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    _bad_files(corpus)
    code = main(
        [
            "prepare-data",
            f"data.source_dir={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'run'}",
            "data.name=bad",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("data error:") and "no documents" in err[-1]


def test_a_missing_source_dir_is_a_config_error_naming_the_field(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="data.source_dir"):
        prepare_indexed_dataset(missing, tmp_path / "ds", ByteTokenizer(), progress=False)
    run_dir = tmp_path / "run"
    code = main(["prepare-data", f"data.source_dir={missing}", f"run.dir={run_dir}"])
    assert code == 2
    assert capsys.readouterr().err.startswith("config error: data.source_dir:")
    assert not run_dir.exists()


def test_a_split_shorter_than_one_sequence_is_refused_before_training(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"tiny_{i}.py").write_text("x = 1\n")
    data = DataConfig(
        source_dir=str(corpus), cache_dir=str(tmp_path / "cache"), name="tiny", valid_fraction=0.5
    )
    pgs = init_distributed(ParallelConfig())
    with pytest.raises(DataError, match=r"fewer than one sequence \(seq_length=64"):
        build_batches(data, TrainConfig(seq_length=64, micro_batch_size=1), pgs, seed=1)


def test_prepare_data_refuses_a_split_shorter_than_one_sequence(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):  # four 40-byte files: each split far below a 4096-token sequence
        (corpus / f"f{i}.py").write_text(f"x_{i} = {i}\n" * 5)
    args = [
        "prepare-data",
        f"data.source_dir={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.valid_fraction=0.5",
        "data.name=short",
    ]
    code = main([*args, f"run.dir={tmp_path / 'long'}", "data.min_seq_length=4096"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("data error:")
    assert "fewer than one sequence (data.min_seq_length=4096 + 1)" in err[-1]
    # the same corpus passes a sequence it can fill, and reuses the cached dataset
    assert main([*args, f"run.dir={tmp_path / 'short'}", "data.min_seq_length=8"]) == 0
