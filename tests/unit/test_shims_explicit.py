"""The compat shims are applied by entry points, explicitly, never by importing the library.

A fresh interpreter (no conftest, no CLI) imports every module of ``megatron_ext``: none of
them may apply a shim. A module that needs them first (it imports megatron-core's Mamba
modules, which import triton) may only fail for that reason, on a machine without triton.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import importlib, json, pkgutil
import torch
import megatron_ext
original = torch.cuda.current_device
failed = {}
for info in pkgutil.walk_packages(megatron_ext.__path__, "megatron_ext."):
    try:
        importlib.import_module(info.name)
    except ImportError as err:
        failed[info.name] = getattr(err, "name", None) or str(err)
from megatron_ext import compat
print(json.dumps({
    "applied": compat._APPLIED,
    "current_device_untouched": torch.cuda.current_device is original,
    "failed": failed,
    "imported": sorted(m for m in __import__("sys").modules if m.startswith("megatron_ext")),
}))
"""


def _fresh_python(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter (no conftest, only the checkout on the path) and
    return the JSON line it printed last."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_library_modules_applies_no_shim():
    out = _fresh_python(PROBE)
    assert out["applied"] == [] and out["current_device_untouched"]
    # the packages that used to apply them on import import cleanly without them
    assert {"megatron_ext.models", "megatron_ext.elastic", "megatron_ext.generate"} <= set(
        out["imported"]
    )
    assert len(out["imported"]) > 50  # the walk reached the library
    assert set(out["failed"].values()) <= {"triton"}, out["failed"]


LOAD_PICKLE = """
import json, pickle, sys
with open(sys.argv[1], "rb") as f:
    state, cfg = pickle.load(f)
from megatron_ext import compat
print(json.dumps({"applied": compat._APPLIED, "keys": sorted(cfg)}))
"""


def test_a_pickled_hydra_state_and_config_load_before_any_shim(tmp_path):
    """A submitit job unpickles Hydra's state (our structured configs inside) before any entry
    point of ours runs: that load must not reach megatron's Mamba modules, which import triton
    (a job of the Slurm sweep failed so)."""
    cloudpickle = pytest.importorskip("cloudpickle", reason="the slurm extra (submitit's)")
    from hydra.core.singleton import Singleton

    from megatron_ext.config.compose import compose_recipe
    from megatron_ext.config.registry import register_schemas

    register_schemas()
    cfg = compose_recipe("train_elastic", [])
    blob = tmp_path / "job.pkl"
    blob.write_bytes(cloudpickle.dumps((Singleton.get_state(), cfg)))
    out = _fresh_python(LOAD_PICKLE, str(blob))
    assert out["applied"] == []
    assert {"model", "elastic", "elastic_train"} <= set(out["keys"])
