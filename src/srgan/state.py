"""A training phase's resumable state on disk: checkpoints and state.json per params digest.

:class:`TrainState` is the only owner of what survives a kill: which folder belongs to which
params (:func:`training_digest`), the MLflow run to continue, whether the phase completed, and the
checkpoints, restored newest intact first.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import dataio
from .config import Config, flatten, resume_safe_keys

log = logging.getLogger(__name__)

# Read by the phase but irrelevant to its weights: never a reason to discard a checkpoint.
NOT_IN_DIGEST = ("evaluate", "tracking")


def training_digest(cfg: Config, phase: str, keys: Sequence[str], data_digest: str | None,
                    init_digest: str | None = None) -> str:
    """Digest of everything that shapes the phase's weights (``keys``: the params the phase reads,
    ``trainer.PHASE_PARAMS``): resume only under the same one."""
    d = cfg.to_dict()
    safe = resume_safe_keys()
    keep: dict[str, Any] = {}
    for key in keys:
        if key.split(".")[0] in NOT_IN_DIGEST:
            continue
        node: Any = d
        for part in key.split("."):
            node = node[part]
        if isinstance(node, dict):
            node = {k: v for k, v in flatten(node, key + ".").items() if k not in safe}
        keep[key] = node
    return dataio.json_digest({"phase": phase, "params": keep, "data": data_digest, "init": init_digest})


_CKPT = re.compile(r"^ckpt-(\d+)\.index$")


class TrainState:
    """A phase's resumable state: ``<root>/<phase>-<digest>/`` with checkpoints and state.json.

    One folder per params digest, so a changed param trains in a new folder and reverting it finds
    the old one again (the newest ``KEEP_FOLDERS`` per phase are kept). state.json holds the
    digest, the MLflow run id and whether the training completed; a completed training is never
    resumed (and its run never reopened): a new run of the same params trains afresh.

    Checkpoints are ``ckpt-<step>`` (TensorFlow's bundle: data written first, the index renamed into
    place last, so an index means a complete save). They are found by listing index files, not
    through TensorFlow's ``checkpoint`` state file, and restored newest first: a damaged one
    (flipped or truncated data, empty index) is skipped with a warning naming it.

    Multi-worker training: the chief's TrainState is this one; every other worker has one with
    ``chief=False`` on the same ``root``, which only reads (it restores the chief's checkpoints, so
    ``root`` must be shared storage or a copy) and saves into a temporary folder deleted right away.
    """

    KEEP_FOLDERS = 3
    KEEP_CHECKPOINTS = 3
    STATE = "state.json"

    def __init__(self, root: Path, phase: str, digest: str, chief: bool = True):
        self.root, self.phase, self.digest, self.chief = Path(root), phase, digest, chief
        self.dir = self.root / f"{phase}-{digest[:16]}"
        self._fresh = False  # a worker that found a finished training: the chief starts it afresh
        if chief:
            self.dir.mkdir(parents=True, exist_ok=True)
        state = dataio.read_json(self.dir / self.STATE, None)
        if state is None and (self.dir / self.STATE).exists():
            log.warning("%s is damaged: ignored (checkpoints in %s are still used)", self.dir / self.STATE, self.dir)
        self._state: dict[str, Any] = state if isinstance(state, dict) and state.get("digest") == digest else {}
        if self._state.get("status") == "complete":
            log.info("a finished training with these params exists in %s (run %s): training afresh",
                     self.dir, self._state.get("run_id"))
            if chief:
                self.reset()
            self._fresh = True
        if chief:
            self._write(status="running")
            self._collect_old_folders()

    # -- state.json ------------------------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        """The MLflow run of the unfinished training in this folder, if any (a worker: the chief's, now)."""
        if not self.chief:
            state = dataio.read_json(self.dir / self.STATE, None)
            return state.get("run_id") if isinstance(state, dict) and state.get("digest") == self.digest else None
        return self._state.get("run_id")

    def bind_run(self, run_id: str) -> None:
        self._write(run_id=run_id)

    def mark_complete(self) -> None:
        """The training finished and its outputs were written: never resume it again."""
        self._write(status="complete")

    def _write(self, **values: Any) -> None:
        if not self.chief:  # the chief's folder is the chief's alone
            return
        self._state.update(values, digest=self.digest, phase=self.phase)
        dataio.write_json_atomic(self.dir / self.STATE, self._state)

    def reset(self) -> None:
        """Forget this folder's checkpoints and run (start from step 0)."""
        if not self.chief:  # never delete the chief's files: just ignore them
            self._fresh, self._state = True, {}
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._state = {}

    def _collect_old_folders(self) -> None:
        mine = sorted(self.root.glob(f"{self.phase}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in [p for p in mine if p != self.dir][self.KEEP_FOLDERS - 1:]:
            shutil.rmtree(old, ignore_errors=True)

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoints(self) -> list[int]:
        """Steps with a complete checkpoint, newest first."""
        if self._fresh or not self.dir.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.dir.iterdir() if (m := _CKPT.match(p.name))]
        return sorted(steps, reverse=True)

    def restore(self, trainer: Any) -> int:
        """Restore the newest intact checkpoint into ``trainer``; returns its step (0 if none)."""
        for step in self.checkpoints():
            prefix = self.dir / f"ckpt-{step}"
            try:
                trainer.checkpoint.read(str(prefix)).assert_existing_objects_matched()
            except Exception as exc:  # noqa: BLE001 - DataLossError, truncation, bad index: all mean damaged
                log.warning("checkpoint %s is damaged (%s: %s); trying an older one", prefix,
                            type(exc).__name__, " ".join(str(exc).split())[:300])
                continue
            if int(trainer.step.numpy()) != step:
                log.warning("checkpoint %s holds step %d; trying an older one", prefix, int(trainer.step.numpy()))
                continue
            return step
        if self.checkpoints():
            log.warning("no intact checkpoint in %s: training from step 0", self.dir)
        return 0

    def save(self, trainer: Any, step: int) -> None:
        """Write ``ckpt-<step>``; keep the newest KEEP_CHECKPOINTS."""
        trainer.step.assign(step)
        if not self.chief:
            # every worker saves (TF's multi-worker checkpointing: a save may run collectives);
            # only the chief's copy is kept
            scratch = Path(tempfile.mkdtemp(prefix=f"srgan-{self.phase}-worker-"))
            try:
                trainer.checkpoint.write(str(scratch / f"ckpt-{step}"))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return
        trainer.checkpoint.write(str(self.dir / f"ckpt-{step}"))
        for old in self.checkpoints()[self.KEEP_CHECKPOINTS:]:
            for f in self.dir.glob(f"ckpt-{old}.*"):
                f.unlink(missing_ok=True)
