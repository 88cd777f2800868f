"""Atomic, verifiable, reshardable checkpoints: one directory ``root/iter_{step:07d}`` with

- the weights in megatron-core's ``torch_dist`` format from ``model.sharded_state_dict()``
  (``*.distcp``, ``.metadata``, ``common.pt``, ``metadata.json``): they load at any TP/EP/PP
  size (a pipeline stage saves its layers under their global layer numbers);
- a megatron-core optimizer's state (the distributed optimizer's sharded Adam moments and
  fp32 main parameters) in the same ``torch_dist`` save under ``optimizer``, in upstream's
  ``fully_reshardable`` form: it loads at another TP/EP/DP size too;
- ``rank_state/rank_{global_rank:05d}.pt``: each rank's ``extra`` (step, RNG, data position,
  ...) and the state of a plain torch optimizer, with the layout they were written at, to
  which they are bound;
- ``manifest.json``, written last: every file's size, the step, the layout, ``complete: true``.

Everything goes to a temporary sibling directory that rank 0 renames into place, so a crash
leaves either a complete checkpoint or a temporary directory, which is ignored. Nothing that
fails verification is ever deleted: a corrupt checkpoint is renamed aside to
``iter_N.corrupt-<UTC time>`` and an unfinished save to ``iter_N.partial-<UTC time>``, both
named in the log, so they stay for inspection.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from megatron_ext.compat.engine import distributed_optimizer_metadata
from megatron_ext.torch_dist import save_sharded as save_sharded

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest.txt"
RANK_STATE = "rank_state"
_TMP = ".tmp_"
_ITER = re.compile(r"^iter_(\d{7})$")
RESTART_FIELD = "run.restart_from_scratch"


OPTIMIZER_KEY = "optimizer"
"""Top-level key of a megatron-core optimizer's sharded state in the torch_dist save."""


def _plain(model: torch.nn.Module) -> Any:
    """``model`` without megatron-core's DDP / Float16Module wrappers: checkpoint keys stay the
    model's own."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


def is_sharded_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a megatron-core optimizer (state saved through torch_dist)."""
    from megatron.core.optimizer import MegatronOptimizer

    return isinstance(optimizer, MegatronOptimizer)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt; the message names its directory."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _agree(problem: str | None) -> str | None:
    """The first rank's problem (prefixed with its rank) if any rank has one, on every rank."""
    if _world() == 1:
        return problem
    problems: list[str | None] = [None] * _world()
    dist.all_gather_object(problems, problem)
    for rank, p in enumerate(problems):
        if p is not None:
            return p if rank == _rank() else f"{p} (seen on rank {rank})"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def set_aside(path: Path, kind: str, why: str) -> Path:
    """Rename ``path`` to ``<name>.<kind>-<UTC time>`` next to it (never deleted); log and return.

    ``kind`` is ``corrupt`` (failed verification), ``partial`` (an unfinished save) or
    ``replaced`` (a complete checkpoint of a step that is saved again).
    """
    name = path.name.removeprefix(_TMP)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{name}.{kind}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{name}.{kind}-{stamp}-{n}")
    os.rename(path, target)
    logger.warning("kept %s checkpoint %s as %s: %s", kind, path, target, why)
    return target


def layout(pg_collection: Any) -> dict[str, int]:
    """This rank's process layout: world size, TP/EP/PP/DP sizes and this rank's place in each."""
    out = {"world_size": _world(), "rank": _rank()}
    for name in ("tp", "ep", "pp", "dp"):
        group = getattr(pg_collection, name, None)
        on = group is not None and dist.is_initialized()
        out[name] = dist.get_world_size(group) if on else 1
        out[f"{name}_rank"] = dist.get_rank(group) if on else 0
    return out


def _sizes(full: dict[str, int]) -> dict[str, int]:
    """The group sizes of a layout; one written before ``pp`` was recorded had ``pp`` = 1."""
    return {k: full.get(k, 1) for k in ("world_size", "tp", "ep", "pp", "dp")}


def _same_layout(saved: dict[str, int], mine: dict[str, int]) -> bool:
    """Whether a rank's saved layout is this rank's (``pp`` defaults to one stage)."""
    fill = {"pp": 1, "pp_rank": 0}
    return {**fill, **saved} == {**fill, **mine}


class CheckpointManager:
    """Save, find, verify and load the checkpoints under ``root``; keeps the newest ``keep``.

    Every method but :meth:`problem` is collective. ``root`` must be on a shared file system.
    """

    def __init__(self, root: str | Path, pg_collection: Any, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.pg_collection = pg_collection
        self.keep = keep

    def path_for(self, step: int) -> Path:
        """The directory of the checkpoint at ``step``."""
        return self.root / f"iter_{step:07d}"

    def save(
        self, step: int, model: torch.nn.Module, optimizer: Any, extra: dict[str, Any]
    ) -> Path:
        """Write the checkpoint of ``step`` atomically and return its directory."""
        final = self.path_for(step)
        tmp = self.root / f"{_TMP}{final.name}"
        mine = layout(self.pg_collection)
        problem = None
        if _rank() == 0:
            try:
                if tmp.exists():
                    set_aside(tmp, "partial", "an earlier save of this step did not finish")
                tmp.mkdir(parents=True)
            except OSError as e:
                problem = f"cannot create {tmp}: {e}"
        problem = _agree(problem)
        if problem is not None:
            raise CheckpointError(f"checkpoint {final}: {problem}")
        sharded = _plain(model).sharded_state_dict()
        in_torch_dist = optimizer is not None and is_sharded_optimizer(optimizer)
        if in_torch_dist:
            opt_state = optimizer.sharded_state_dict(  # type: ignore[union-attr]
                sharded, metadata=distributed_optimizer_metadata()
            )
            sharded = {**sharded, OPTIMIZER_KEY: opt_state}
        save_sharded(sharded, tmp)
        state = {
            "layout": mine,
            "optimizer": None if optimizer is None or in_torch_dist else optimizer.state_dict(),
            "sharded_optimizer": in_torch_dist,
            "extra": extra,
        }
        rank_file = tmp / RANK_STATE / f"rank_{_rank():05d}.pt"
        try:  # e.g. ENOSPC: the older checkpoints stay untouched, this one stays partial
            rank_file.parent.mkdir(exist_ok=True)
            _write_durable(rank_file, lambda f: torch.save(state, f))
        except OSError as e:
            problem = f"writing {rank_file.relative_to(tmp)} failed: {e}"
        problem = _agree(problem)  # also: every rank's files are written
        if problem is not None:
            raise CheckpointError(f"checkpoint {final}: {problem}")
        if _rank() == 0:
            try:
                self._publish(step, tmp, final, _sizes(mine), in_torch_dist)
            except OSError as e:
                problem = f"publishing failed: {e}"
        problem = _agree(problem)
        if problem is not None:
            raise CheckpointError(f"checkpoint {final}: {problem}")
        return final

    def _publish(
        self, step: int, tmp: Path, final: Path, sizes: dict[str, int], sharded_opt: bool
    ) -> None:
        """Rank 0: write the manifest, rename into place, update ``latest.txt``, prune."""
        files = {
            p.relative_to(tmp).as_posix(): p.stat().st_size
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "step": step,
            "layout": sizes,
            "files": files,
            "sharded_optimizer": sharded_opt,
            "complete": True,
        }
        _write_durable(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: the old one is kept aside, never deleted
            why = self.problem(final)
            set_aside(final, "corrupt" if why else "replaced", why or "this step is saved again")
        os.rename(tmp, final)
        latest_tmp = self.root / f"{_TMP}{LATEST}"
        _write_durable(latest_tmp, lambda f: f.write(f"{final.name}\n".encode()))
        os.replace(latest_tmp, self.root / LATEST)
        _fsync_dir(self.root)
        self._prune()

    def _prune(self) -> None:
        """Rank 0: delete all but the newest ``keep`` valid checkpoints.

        A corrupt old checkpoint and the temporary directory of an unfinished save are set
        aside (renamed, named in the log) instead of deleted.
        """
        for old in self._candidates()[self.keep :]:
            why = self.problem(old)
            if why is None:
                shutil.rmtree(old, ignore_errors=True)
            else:
                set_aside(old, "corrupt", why)
        self._set_aside_unfinished()

    def _set_aside_unfinished(self) -> None:
        """Rank 0: rename the temporary directories of unfinished saves aside."""
        if not self.root.is_dir():
            return
        for stale in sorted(self.root.glob(f"{_TMP}iter_*")):
            if stale.is_dir():
                set_aside(stale, "partial", "the save did not finish (the run was stopped)")

    def _candidates(self) -> list[Path]:
        """``iter_*`` directories under ``root``, newest first (temporary dirs excluded)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _ITER.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def problem(self, path: str | Path) -> str | None:
        """Why ``path`` is not a complete checkpoint on this rank's view of the disk, or None."""
        path = Path(path)
        if not path.is_dir():
            return "directory does not exist"
        if path.name.startswith(_TMP):
            return "is the temporary directory of an unfinished save"
        leftovers = sorted(p.name for p in path.iterdir() if p.name.startswith(_TMP))
        if leftovers:
            return f"contains temporary files {leftovers}"
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return f"{MANIFEST} is missing (the save did not finish)"
        except (OSError, ValueError) as e:
            return f"{MANIFEST} is unreadable: {e}"
        if not isinstance(manifest, dict) or manifest.get("complete") is not True:
            return f"{MANIFEST} does not mark the checkpoint complete"
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return f"{MANIFEST} lists no files"
        for rel, size in sorted(files.items()):
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            actual = f.stat().st_size
            if actual != size:
                return f"{rel} has {actual} bytes but the manifest says {size} (truncated?)"
        return None

    def verify(self, path: str | Path) -> dict[str, Any]:
        """The manifest of ``path`` if it verifies on every rank, else :class:`CheckpointError`."""
        path = Path(path)
        problem = _agree(self.problem(path))
        if problem is not None:
            raise CheckpointError(f"checkpoint {path}: {problem}")
        return json.loads((path / MANIFEST).read_text())

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that verifies on every rank (the same on all ranks), or None.

        Checkpoints that fail verification are skipped with a warning naming them and why.
        """
        names = [p.name for p in self._candidates()]
        if _world() > 1:
            box = [names]
            dist.broadcast_object_list(box, src=0)
            names = box[0]
        for name in names:
            path = self.root / name
            problem = _agree(self.problem(path))
            if problem is None:
                return path
            if _rank() == 0:
                logger.warning("skipping checkpoint %s: %s", path, problem)
        return None

    def resume_point(self, restart_from_scratch: bool = False) -> Path | None:
        """The checkpoint a run resumes from; corrupt ones on the way are set aside. Collective.

        Checks the ``iter_*`` directories newest first: each that fails verification is
        renamed to ``iter_N.corrupt-<time>`` and named in the log; unfinished saves become
        ``iter_N.partial-<time>``. Returns the first valid one, or None when there was no
        checkpoint. When checkpoints existed and none is valid it raises
        :class:`CheckpointError` naming each and why, unless ``restart_from_scratch``: then it
        logs that the run starts over and returns None.
        """
        names = [p.name for p in self._candidates()]
        if _world() > 1:
            box = [names]
            dist.broadcast_object_list(box, src=0)
            names = box[0]
        found: Path | None = None
        bad: list[tuple[Path, str]] = []
        for name in names:
            path = self.root / name
            problem = _agree(self.problem(path))
            if problem is None:
                found = path
                break
            bad.append((path, problem))
        if bad and found is None and not restart_from_scratch:
            raise CheckpointError(self._refusal(bad))
        if _rank() == 0:
            kept = [set_aside(path, "corrupt", why).name for path, why in bad]
            self._set_aside_unfinished()
            if bad and found is None:
                logger.warning(
                    "no valid checkpoint under %s (corrupt ones kept as %s): starting from "
                    "step 0 (%s=true)",
                    self.root,
                    ", ".join(kept),
                    RESTART_FIELD,
                )
        if _world() > 1:
            dist.barrier()
        return found

    def _refusal(self, bad: list[tuple[Path, str]]) -> str:
        listing = "; ".join(f"{path.name}: {why}" for path, why in bad)
        return (
            f"no valid checkpoint under {self.root}, refusing to start over ({listing}); set "
            f"{RESTART_FIELD}=true to train from step 0 (they will be kept aside)"
        )

    def scan(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The newest valid checkpoint (or None) and every newer one with its problem.

        Not collective and changes nothing: for the launcher, before any rank starts.
        """
        bad: list[tuple[Path, str]] = []
        for path in self._candidates():
            why = self.problem(path)
            if why is None:
                return path, bad
            bad.append((path, why))
        return None, bad

    def check_resumable(self, restart_from_scratch: bool = False) -> None:
        """Raise :class:`CheckpointError` where :meth:`resume_point` would; changes nothing.

        Not collective: for the launcher, before any rank starts.
        """
        found, bad = self.scan()
        if found is None and bad and not restart_from_scratch:
            raise CheckpointError(self._refusal(bad))

    def load(
        self,
        path: str | Path,
        model: torch.nn.Module,
        optimizer: Any = None,
        *,
        weights_only: bool = False,
    ) -> dict[str, Any]:
        """Load the checkpoint at ``path`` into ``model`` (and ``optimizer``).

        Weights load at any TP/EP/DP layout, and so does a megatron-core optimizer's state
        (saved through torch_dist); without it, a megatron optimizer's fp32 main parameters are
        refreshed from the loaded weights. With the layout they were saved at (and not
        ``weights_only``) a plain optimizer's state is restored too and this rank's ``extra`` is
        returned. Under another layout ``{"resharded": True}`` is returned: per-rank RNG and
        data state cannot follow a layout change.
        Raises :class:`CheckpointError` if the checkpoint is partial or corrupt.
        """
        from megatron.core import dist_checkpointing

        path = Path(path)
        manifest = self.verify(path)
        sharded_opt = optimizer is not None and is_sharded_optimizer(optimizer)
        with_opt = sharded_opt and not weights_only and bool(manifest.get("sharded_optimizer"))
        problem = None
        opt_state = None
        try:
            request = _plain(model).sharded_state_dict()
            if with_opt:
                opt_request = optimizer.sharded_state_dict(  # type: ignore[union-attr]
                    request, is_loading=True, metadata=distributed_optimizer_metadata()
                )
                request = {**request, OPTIMIZER_KEY: opt_request}
            state = dist_checkpointing.load(request, str(path))
            # Its non-tensor part comes back from common.pt whether requested or not.
            opt_state = state.pop(OPTIMIZER_KEY, None) if with_opt else None
            state.pop(OPTIMIZER_KEY, None)
            _plain(model).load_state_dict(state)
        except (Exception, CheckpointException) as e:  # the latter is a BaseException
            last = str(e).strip().splitlines()[-1:] or [type(e).__name__]
            problem = f"the weights do not load into this model: {last[0]}"
        problem = _agree(problem)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path}: {problem}")
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)  # type: ignore[union-attr]
        elif sharded_opt:
            optimizer.reload_model_params()  # type: ignore[union-attr]

        mine = layout(self.pg_collection)
        if weights_only:
            same = _sizes(manifest.get("layout") or {}) == _sizes(mine)
            return {} if same else {"resharded": True}
        saved = None
        rank_file = path / RANK_STATE / f"rank_{_rank():05d}.pt"
        if _sizes(manifest.get("layout") or {}) == _sizes(mine) and rank_file.is_file():
            saved = torch.load(rank_file, map_location="cpu", weights_only=False)
        same = saved is not None and _same_layout(saved.get("layout") or {}, mine)
        mismatch = None if same else "layout"
        if _agree(mismatch) is not None:  # every rank takes the same branch
            if _rank() == 0:
                logger.warning(
                    "checkpoint %s was saved at layout %s, this run is %s: loaded the weights "
                    "%s; RNG and data-iterator state cannot follow a layout change",
                    path,
                    manifest.get("layout"),
                    _sizes(mine),
                    "and the sharded optimizer state" if with_opt else "only",
                )
            return {"resharded": True}
        assert saved is not None
        if optimizer is not None and not sharded_opt:
            if saved["optimizer"] is None:
                raise CheckpointError(f"checkpoint {path}: it was saved without optimizer state")
            optimizer.load_state_dict(saved["optimizer"])
        elif sharded_opt and not with_opt:
            raise CheckpointError(f"checkpoint {path}: it was saved without optimizer state")
        return dict(saved["extra"])
