"""Data layer: byte tokenizer, indexed-dataset preparation, GPTDataset, BatchIterator."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.data.loader import BATCH_KEYS, BatchIterator, build_gpt_dataset
from megatron_ext.data.prepare import (
    default_corpus_dir,
    list_corpus_files,
    prepare_indexed_dataset,
)
from megatron_ext.data.tokenizer import ByteTokenizer, build_tokenizer

SEQ = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 real stdlib files, plus files that must be skipped (tests dir, binary, empty)."""
    src = tmp_path_factory.mktemp("corpus")
    stdlib = default_corpus_dir()
    picked = [p for p in list_corpus_files(stdlib) if 500 < p.stat().st_size < 60_000][:20]
    assert len(picked) == 20
    for path in picked:
        dst = src / path.relative_to(stdlib)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
    (src / "tests").mkdir()
    (src / "tests" / "test_skipped.py").write_text("skipped = True\n")
    (src / "binary.py").write_bytes(b"\x00\x01\x02binary")
    (src / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (src / "empty.py").write_text("")
    (src / "special.py").write_text("s = '<eod> <pad> <think>x</think>'\n")
    return src


def _expected_texts(src: Path) -> list[str]:
    """Independent oracle: UTF-8, non-empty, NUL-free .py files outside tests/."""
    texts = []
    for path in sorted(src.rglob("*.py")):
        data = path.read_bytes()
        if "tests" in path.relative_to(src).parts or not data or b"\x00" in data:
            continue
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


@pytest.fixture(scope="module")
def prepared(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("data") / "corpus"
    return prepare_indexed_dataset(corpus, out, ByteTokenizer(), valid_fraction=0.3, progress=False)


def _documents(prefix: str, tok: ByteTokenizer) -> list[str]:
    ds = IndexedDataset(prefix)
    docs = []
    for i in range(len(ds)):
        ids = ds[i]
        assert ids.dtype == np.uint16
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        docs.append(tok.decode(ids[:-1]))
    return docs


def test_byte_tokenizer_round_trips_utf8_and_literal_special_tokens() -> None:
    tok = ByteTokenizer()
    text = "héllo wörld 日本語 🙂 <think>reason</think> a<eod>b <pad> <thin </thinkx> \x00\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [tok.eod, tok.pad, tok.think, tok.end_think] == [256, 257, 258, 259]
    assert ids.count(tok.think) == 1 and ids.count(tok.end_think) == 1
    assert ids.count(tok.eod) == 1 and ids.count(tok.pad) == 1
    assert max(tok.encode(text, parse_special=False)) < 256
    assert tok.decode(tok.encode(text, parse_special=False)) == text
    assert tok.vocab_size == 260 and tok.padded_vocab_size(128) == 384
    assert tok.decode([0xE6, 300]) == "\ufffd\ufffd"


def test_build_tokenizer_names_bad_kind() -> None:
    assert isinstance(build_tokenizer("byte", None), ByteTokenizer)
    with pytest.raises(ValueError, match="'wordpiece'"):
        build_tokenizer("wordpiece", None)


def test_hf_tokenizer_names_missing_tokenizers_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="'tokenizers'"):
        build_tokenizer("hf", "tokenizer.json")


def test_hf_tokenizer_round_trips_and_finds_special_ids(tmp_path: Path) -> None:
    tk = pytest.importorskip("tokenizers")
    raw = tk.Tokenizer(tk.models.BPE())
    raw.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer)
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer("hf", tmp_path)
    text = "def g(y): return y <pad> <|endoftext|> héllo"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eod in tok.encode(text) and tok.eod not in tok.encode(text, parse_special=False)
    assert (tok.eod, tok.pad) == (0, 1) and tok.kind == "hf"


def test_prepare_round_trips_documents_and_meta_counts(corpus: Path, prepared: dict) -> None:
    tok = ByteTokenizer()
    train = _documents(prepared["train_prefix"], tok)
    valid = _documents(prepared["valid_prefix"], tok)
    expected = _expected_texts(corpus)
    assert sorted(train + valid) == sorted(expected)
    assert len(train) > 0 and len(valid) > 0
    assert not set(train) & set(valid)
    meta = json.loads(
        Path(prepared["train_prefix"][: -len("_train_text_document")] + "_meta.json").read_text()
    )
    for key, value in prepared.items():
        assert meta[key] == value
    assert meta["train_documents"] == len(train) and meta["valid_documents"] == len(valid)
    # Keep the IndexedDataset alive while using its arrays: they are views into mmaps
    # that IndexedDataset.__del__ closes (using them afterwards segfaults).
    train_ds = IndexedDataset(prepared["train_prefix"])
    assert meta["train_tokens"] == int(train_ds.sequence_lengths.sum())
    assert meta["tokenizer_kind"] == "byte" and meta["vocab_size"] == 260


def test_prepare_split_is_deterministic_across_runs(
    corpus: Path, tmp_path: Path, prepared: dict
) -> None:
    again = prepare_indexed_dataset(
        corpus, tmp_path / "again", ByteTokenizer(), valid_fraction=0.3, progress=False
    )
    for split in ("train", "valid"):
        for ext in (".bin", ".idx"):
            a = Path(prepared[f"{split}_prefix"] + ext).read_bytes()
            b = Path(again[f"{split}_prefix"] + ext).read_bytes()
            assert a == b, f"{split}{ext} differs between runs"


def test_prepare_max_files_limits_documents(corpus: Path, tmp_path: Path) -> None:
    out = prepare_indexed_dataset(
        corpus, tmp_path / "few", ByteTokenizer(), max_files=5, progress=False
    )
    assert out["train_documents"] + out["valid_documents"] == 5


@pytest.fixture(scope="module")
def gpt_dataset(prepared: dict, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("index_cache")
    return build_gpt_dataset(
        prepared["train_prefix"], SEQ, 200, ByteTokenizer(), seed=7, cache_dir=cache
    )


def test_gpt_samples_are_seq_plus_one_windows_with_shifted_labels(
    gpt_dataset, prepared: dict
) -> None:
    ds = IndexedDataset(prepared["train_prefix"])
    assert len(gpt_dataset) >= 200
    for i in (0, 1, 17, len(gpt_dataset) - 1):
        sample = gpt_dataset[i]
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens.shape == labels.shape == (SEQ,)
        assert torch.equal(tokens[1:], labels[:-1])
        assert torch.equal(sample["position_ids"], torch.arange(SEQ))
        assert torch.all(sample["loss_mask"] == 1.0)
        # The window is seq+1 contiguous tokens of the shuffled document stream.
        j = int(gpt_dataset.shuffle_index[i])
        doc_pos, offset = (int(x) for x in gpt_dataset.sample_index[j])
        stream = np.concatenate(
            [ds[int(d)] for d in gpt_dataset.document_index[doc_pos : doc_pos + SEQ + 2]]
        )
        window = torch.cat([tokens, labels[-1:]]).numpy()
        np.testing.assert_array_equal(window, stream[offset : offset + SEQ + 1])


def test_batch_iterator_resume_yields_the_same_next_batch(gpt_dataset) -> None:
    straight = BatchIterator(gpt_dataset, batch_size=4)
    for _ in range(3):
        next(straight)
    state = straight.state_dict()
    expected = next(straight)

    resumed = BatchIterator(gpt_dataset, batch_size=4)
    resumed.load_state_dict(state)
    got = next(resumed)
    assert set(got) == set(BATCH_KEYS)
    assert got["tokens"].shape == (4, SEQ) and got["tokens"].dtype == torch.int64
    assert got["loss_mask"].dtype == torch.float32
    for key in BATCH_KEYS:
        assert torch.equal(got[key], expected[key])
    assert state["consumed_samples"] == 12


def test_batch_iterator_dp_ranks_get_disjoint_slices_of_the_global_batch(gpt_dataset) -> None:
    ranks = [
        BatchIterator(gpt_dataset, batch_size=3, dp_rank=r, dp_size=2, start=5) for r in (0, 1)
    ]
    single = BatchIterator(gpt_dataset, batch_size=6, start=5)
    for _ in range(2):
        idx0, idx1 = ranks[0].sample_indices(), ranks[1].sample_indices()
        assert not set(idx0) & set(idx1)
        assert idx0 + idx1 == single.sample_indices()
        b0, b1, whole = next(ranks[0]), next(ranks[1]), next(single)
        assert torch.equal(torch.cat([b0["tokens"], b1["tokens"]]), whole["tokens"])
    assert ranks[0].consumed_samples == ranks[1].consumed_samples == 5 + 2 * 6


def test_batch_iterator_stops_at_end_unless_cycling(gpt_dataset) -> None:
    n = len(gpt_dataset)
    it = BatchIterator(gpt_dataset, batch_size=4, start=n - 4)
    next(it)
    with pytest.raises(StopIteration):
        next(it)
    cyc = BatchIterator(gpt_dataset, batch_size=4, start=n - 2, cycle=True)
    assert cyc.sample_indices() == [n - 2, n - 1, 0, 1]
    next(cyc)
