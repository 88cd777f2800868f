"""One writer per run directory: a second start is refused, a dead holder's lock taken over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ext.run_lock import LOCK_FILE, RunDirLocked, RunLock
from recipes.cli import main

HOLD = (
    "import sys, time; from megatron_ext.run_lock import RunLock; "
    "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
)


def _holder(run_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_start_is_refused_naming_the_holders_host_and_pid(tmp_path, capsys):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunDirLocked, match=f"host {socket.gethostname()} pid {holder.pid}"):
            RunLock(tmp_path).acquire()
        # through the command line: exit 1, one line, before anything is written
        code = main(["train-parent", f"run.dir={tmp_path}", "logger=none"])
        err = capsys.readouterr().err.strip()
        assert code == 1
        assert err.startswith("run.dir error:") and f"pid {holder.pid}" in err
        assert "\n" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path, caplog):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path) as lock:
        assert lock.path.read_text().strip() == f"host {socket.gethostname()} pid {os.getpid()}"
    assert any(f"pid {holder.pid}" in r.getMessage() for r in caplog.records)
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: no holder named


def test_the_lock_is_held_for_the_whole_run_and_released_after(tmp_path):
    lock = RunLock(tmp_path).acquire()
    start = time.monotonic()
    with pytest.raises(RunDirLocked):
        RunLock(tmp_path).acquire()
    lock.release()
    RunLock(tmp_path).acquire().release()
    assert time.monotonic() - start < 5
