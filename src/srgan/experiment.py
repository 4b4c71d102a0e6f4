"""A training phase as an MLflow run: the glue between ``trainer.train`` and ``tracking``.

Used by the pretrain and train stages (one run each per `dvc repro`), by every tuning trial (a
nested run) and by the study. Resume: a killed run continues in the same MLflow run when the
params digest is the same (``state.TrainState`` knows the run); a finished run is never reopened.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import dataio, distribute, tracking
from .config import Config
from .dataio import HISTORY_NAME, SUMMARY_NAME
from .metrics import val_key
from .state import TrainState, training_digest
from .trainer import (PHASE_PARAMS, Callback, Phase, Runtime, TrainData, TrainResult, d_health_warning, prepare_runtime,
                      train)

log = logging.getLogger(__name__)


def phase_params(cfg: Config, phase: Phase) -> dict[str, Any]:
    """The flat params a phase's run logs: exactly what the phase reads."""
    flat = cfg.flat()
    keys = PHASE_PARAMS[phase]
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in keys)}


class MlflowCallback(Callback):
    """Logs params, per-interval losses, validation metrics and image grids to one run."""

    def __init__(self, run: tracking.Run, phase: Phase, baseline: dict[str, float]):
        self.run, self.phase, self.baseline = run, phase, baseline

    def on_train_begin(self, cfg: Config, start_step: int, total_steps: int) -> None:
        self.run.log_params(phase_params(cfg, self.phase))
        self.run.log_metrics(self.baseline, step=0)
        if start_step:
            self.run.set_tags({"resumed_from_step": start_step})

    def on_runtime(self, runtime: dict[str, str]) -> None:
        self.run.set_tags(runtime)

    def on_log(self, step: int, logs: dict[str, float]) -> None:
        self.run.log_metrics(logs, step=step)

    def on_validation(self, step: int, metrics: dict[str, float], grid: np.ndarray | None) -> None:
        gain = {val_key("psnr_y_gain"): metrics[val_key("psnr_y")] - self.baseline["bicubic_psnr_y"]}
        self.run.log_metrics({**metrics, **gain}, step=step)
        if grid is not None:
            self.run.log_image(grid, f"validation/step_{step:07d}.png")


class HistoryWriter(Callback):
    """Training curves as CSV for `dvc plots`, rewritten atomically at every log.

    ``keep`` is a second copy in the resumable state folder: DVC deletes a stage's outputs before
    it re-runs the stage, so after a kill the curve so far is read back from there.
    """

    def __init__(self, path: Path, keep: Path | None = None):
        self.path, self.keep = Path(path), Path(keep) if keep else None
        self.rows: list[dict[str, float]] = []

    def on_train_begin(self, cfg: Config, start_step: int, total_steps: int) -> None:
        self.rows = []
        if start_step:
            for src in (self.path, self.keep):
                old = [{k: float(v) for k, v in r.items() if v not in ("", None)}
                       for r in dataio.read_csv(src)] if src else []
                if old:
                    self.rows = [r for r in old if r.get("step", 0) <= start_step]
                    break

    def _write(self) -> None:
        keys = sorted({k for r in self.rows for k in r}, key=lambda k: (k != "step", k))
        for dst in (self.path, self.keep):
            if dst is not None:
                dataio.write_csv_atomic(dst, self.rows, keys)

    def on_log(self, step: int, logs: dict[str, float]) -> None:
        self.rows.append({"step": step, **logs})
        self._write()

    def on_validation(self, step: int, metrics: dict[str, float], grid: np.ndarray | None) -> None:
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update(metrics)
        else:
            self.rows.append({"step": step, **metrics})
        self._write()


def run_training(
    cfg: Config,
    phase: Phase,
    data: TrainData,
    model_path: Path | None = None,
    ckpt_root: Path | None = None,
    reports_dir: Path | None = None,
    callbacks: Sequence[Callback] = (),
    parent_run_id: str | None = None,
    run_name: str | None = None,
    extra_tags: dict[str, object] | None = None,
    exception_status: dict[type, str] | None = None,
    init_generator: Path | None = None,
    data_offset: int = 0,
) -> tuple[str, TrainResult]:
    """Train one phase under an MLflow run; returns (run id, result).

    ``ckpt_root`` holds the resumable state (see ``state.TrainState``). On success the generator
    is saved to ``model_path`` and logged as the run's artifact ``model/<name>.keras`` (the
    adversarial phase's also as the servable MLflow Model), and ``reports_dir`` gets history.csv
    and summary.json. A failure (e.g. a NaN loss) marks the run FAILED and re-raises.

    ``train.distribute: multi_worker``: only the chief does all of this; every other worker trains
    the same steps and writes nothing of its own (see :func:`_train_as_worker`).
    """
    runtime = prepare_runtime(cfg, phase)  # the strategy, task and precision of this process, once
    task = runtime.task
    init_digest = dataio.sha256_file(init_generator) if init_generator else None
    state = (TrainState(ckpt_root, phase, training_digest(cfg, phase, PHASE_PARAMS[phase], data.manifest_digest, init_digest),
                        chief=task.chief)
             if ckpt_root is not None else None)
    if not task.chief:
        return _train_as_worker(cfg, phase, data, state, callbacks, init_generator, data_offset, runtime)
    run = tracking.resume_run(state.run_id) if state is not None and state.run_id else None
    if run is not None:
        log.info("continuing MLflow run %s", run.run_id)
    else:
        tags = {**tracking.config_tags(cfg, data.manifest_digest), "phase": phase, **(extra_tags or {})}
        if phase == "gan":
            tags["adv.loss"] = cfg.adv.loss
        run = tracking.start_run(cfg.tracking.experiment, run_name=run_name, parent_run_id=parent_run_id, tags=tags)
        if data.manifest_digest:  # the shards and validation images the run reads, by content digest
            for folder, context in ((data.shard_dir, "training"), (data.shard_dir.parent / "valid", "validation")):
                run.log_dataset(f"{cfg.data.source}/{folder.name}", data.manifest_digest, folder, context)
    if state is not None:
        state.bind_run(run.run_id)
    baseline = data.baseline(cfg.preprocess.scale)
    cbs: list[Callback] = [MlflowCallback(run, phase, baseline), *callbacks]
    if reports_dir is not None:
        cbs.append(HistoryWriter(Path(reports_dir) / HISTORY_NAME, state.dir / HISTORY_NAME if state else None))
    started = time.time()
    with tracking.run_context(run, exception_status), run.system_metrics():
        run.log_dict(cfg.to_dict(), "config/params.json")
        trainer, result = train(cfg, phase, data, state, cbs, init_generator=init_generator, data_offset=data_offset,
                                runtime=runtime)
        summary = {**baseline, **result.val, "train_seconds_this_session": time.time() - started,
                   "total_steps": result.total_steps, "resumed_from": result.resumed_from}
        if warning := d_health_warning(result.val):
            summary["d_health_warning"] = warning
            run.set_tags({"d_health": "at chance", "d_health.warning": warning})
        run.log_metrics({"total_steps": result.total_steps}, step=result.step)  # for compare.py
        if model_path is not None:
            trainer.export_generator(model_path)
            run.log_artifact(model_path, "model")
            if phase == "gan":
                # the servable MLflow Model too: `mlflow models serve -m runs:/<id>/mlflow_model`
                ev = cfg.evaluate
                tracking.log_generator_model(run.run_id, model_path, ev.tile, ev.tile_overlap, cfg.preprocess.scale)
        if reports_dir is not None:
            dataio.write_json_atomic(Path(reports_dir) / SUMMARY_NAME, {"run_id": run.run_id, **summary})
            run.log_artifact(Path(reports_dir) / HISTORY_NAME, "train")
    if state is not None:
        state.mark_complete()
    try:
        _end_together(trainer, task)
    except distribute.WorkerLostError as exc:  # the outputs are complete: nothing to redo
        log.warning("training complete, but at the end: %s", exc)
    return run.run_id, result


# the workers' last collective: they end when the chief's outputs are written (no worker exits while
# the chief still works, which the chief's heartbeat check would report as a dead worker)
_END_HINT = "It happened after the training steps, while the chief wrote its outputs."


def _end_together(trainer: Any, task: distribute.Task) -> None:
    distribute.across_workers(trainer.strategy, task, {"finished": 1}, _END_HINT)


def _train_as_worker(cfg: Config, phase: Phase, data: TrainData, state: TrainState | None,
                     callbacks: Sequence[Callback], init_generator: Path | None,
                     data_offset: int, runtime: Runtime) -> tuple[str, TrainResult]:
    """A non-chief worker of a multi-worker training: the chief's steps and checkpoint saves
    (TensorFlow's multi-worker rule: every worker saves, as a save may run collectives; the
    worker's go to a temporary folder, see ``TrainState``), but nothing of its own is kept: no
    MLflow run, no reports, no model (the chief's ``model_path``: a .keras export reads each
    variable's local copy, no collective, so the worker skips it). Returns the chief's run id
    (from the shared checkpoint folder)."""
    task = runtime.task
    log.info("%s of a multi-worker training: the chief logs the MLflow run and writes the outputs", task.name)
    trainer, result = train(cfg, phase, data, state, callbacks, init_generator=init_generator, data_offset=data_offset,
                            runtime=runtime)
    _end_together(trainer, task)
    return (state.run_id if state is not None else None) or "", result
