"""A real one-node Slurm (Debian ``slurm-wlm`` 22.05 + ``munge``) on localhost, for tests.

Everything it writes (config, munge key and socket, state, spool, pid and log files) lives
under one directory; the daemons run in the foreground as children of this process and are
stopped by the PIDs recorded at start, never by name. It runs as root without systemd or
cgroups (``proctrack/linuxproc``, ``task/none``, no accounting).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be started here; the message says why (the test skips with it)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


SLURM_CONF = """\
ClusterName=starelastic
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd-%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """A running one-node cluster: ``env`` points Slurm's clients at it (``SLURM_CONF``)."""

    root: Path
    env: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """Run a Slurm client command against this cluster; return its stdout."""
        proc = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` of ``job_id`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        fields: dict[str, str] = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def logs(self) -> str:
        """The daemons' log files (for assertion messages)."""
        parts = []
        for f in sorted((self.root / "log").glob("*.log")):
            parts.append(f"==> {f.name} <==\n{f.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the daemons this object started, by their recorded PIDs (reverse order)."""
        for name in reversed(list(self._procs)):
            proc = self._procs[name]
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        self._procs.clear()


def missing_tools() -> list[str]:
    """The Slurm/munge executables this helper needs that are not installed."""
    return [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]


def start_cluster(root: Path, cpus: int = 2, timeout: float = 40) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under ``root`` and wait until the node is idle.

    Raises :class:`SlurmUnavailable` (after stopping whatever did start) when a tool is
    missing, this is not root, or the node does not come up within ``timeout`` seconds.
    """
    missing = missing_tools()
    if missing:
        raise SlurmUnavailable(
            f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        raise SlurmUnavailable("a throw-away Slurm needs root (SlurmUser=root)")
    root = Path(root)
    for sub in ("munge", "state", "spool", "run", "log", "etc"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    conf = root / "etc" / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            root=root,
            cpus=cpus,
            memory_mb=max(1024, _memory_mb() - 1024),
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
        )
    )
    env = dict(os.environ, SLURM_CONF=str(conf))
    path = env.get("PATH", "")
    env["PATH"] = f"{path}:/usr/sbin:/usr/bin" if path else "/usr/sbin:/usr/bin"
    cluster = SlurmCluster(root=root, env=env)
    munge = root / "munge"
    commands = {
        "munged": [
            _which("munged") or "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={munge / 'munge.socket.2'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={root / 'log' / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
        ],
        "slurmctld": [_which("slurmctld") or "slurmctld", "-D", "-i", "-f", str(conf)],
        "slurmd": [_which("slurmd") or "slurmd", "-D", "-N", "localhost", "-f", str(conf)],
    }
    try:
        for name, cmd in commands.items():
            with open(root / "log" / f"{name}.stdout", "wb") as out:
                proc = subprocess.Popen(
                    cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            cluster._procs[name] = proc
            cluster.pids[name] = proc.pid
            if name == "munged":
                _wait_for(lambda: (munge / "munge.socket.2").exists(), 10, "munged's socket")
            time.sleep(0.3)
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with {proc.returncode}")
        _wait_for(lambda: _node_ready(cluster), timeout, "the node to become idle")
    except BaseException as err:
        logs = cluster.logs()
        cluster.stop()
        if isinstance(err, SlurmUnavailable):
            raise SlurmUnavailable(f"{err}\n{logs}") from None
        raise
    return cluster


def _node_ready(cluster: SlurmCluster) -> bool:
    try:
        out = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return out.strip().rstrip("*") in ("idle", "mixed", "allocated")


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}")
