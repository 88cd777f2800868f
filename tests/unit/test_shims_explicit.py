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


def test_importing_library_modules_applies_no_shim():
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["applied"] == [] and out["current_device_untouched"]
    # the packages that used to apply them on import import cleanly without them
    assert {"megatron_ext.models", "megatron_ext.elastic", "megatron_ext.generate"} <= set(
        out["imported"]
    )
    assert len(out["imported"]) > 50  # the walk reached the library
    assert set(out["failed"].values()) <= {"triton"}, out["failed"]
