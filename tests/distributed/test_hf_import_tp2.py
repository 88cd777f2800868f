"""Imported Hugging Face checkpoints compute ``transformers``' logits at TP=2 too.

Every family of :mod:`tests.export.hf_tiny`, tied and untied, is imported at TP=1 here; one
2-rank torchrun launch (``cases_hf_import.py``) loads each torch_dist run at TP=2 (sequence
parallel) and compares its gathered logits with ``transformers``'.

Tolerance: fp32; TP splits heads, FFN / expert channels and Mamba heads over two ranks, so
row-parallel sums and the sequence-parallel gathers reorder additions: rounding on top of the
<= 7.2e-7 of TP=1 (``tests/export/test_hf_import.py``). A wrong shard gives order 0.1-1.
ATOL = 1e-5 as at TP=1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_ext.export.hf.import_run import import_hf
from megatron_ext.parallel import ParallelConfig, init_distributed
from tests.distributed.launch import case, run_cases
from tests.export.hf_tiny import FAMILIES, hf_logits, write_hf

pytest.importorskip("transformers", reason="the hf extra is not installed")

SCRIPT = Path(__file__).with_name("cases_hf_import.py")
ATOL = 1e-5
CASES = [f"{f}-{'tied' if t else 'untied'}" for f in FAMILIES for t in (False, True)]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hf_import_tp2")
    pgs = init_distributed(ParallelConfig())
    for name in CASES:
        family, tie = name.rsplit("-", 1)
        inputs = root / "inputs" / name
        model = write_hf(family, tie == "tied", inputs / "hf")
        torch.save(hf_logits(model), inputs / "expected.pt")
        import_hf(inputs / "hf", inputs / "run", pgs)
    return run_cases(SCRIPT, root)


@pytest.mark.parametrize("name", CASES)
def test_imported_checkpoint_at_tp2_computes_transformers_logits(results, name):
    diff = case(results, name)["max_abs_diff"]
    assert diff <= ATOL, f"{name} at TP=2: max |megatron - transformers| = {diff:.3g}"
