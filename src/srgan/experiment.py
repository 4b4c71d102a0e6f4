"""A training run as an MLflow run: the glue between ``trainer.train`` and ``tracking``.

Used by the train stage (one run per `dvc repro`) and by every tuning trial (a nested run).
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import tracking
from .config import Config
from .fsutil import read_json, write_json_atomic
from .trainer import Callback, TrainData, TrainResult, export_generator, train

log = logging.getLogger(__name__)


class MlflowCallback(Callback):
    """Logs params, per-interval losses, validation metrics and image grids to one run."""

    def __init__(self, run: tracking.Run, baseline: dict[str, float]):
        self.run, self.baseline = run, baseline

    def on_train_begin(self, cfg: Config, start_step: int, total_steps: int) -> None:
        self.run.log_params(cfg.flat())
        self.run.log_metrics(self.baseline, step=0)
        if start_step:
            self.run.set_tags({"resumed_from_step": start_step})

    def on_log(self, step: int, logs: dict[str, float]) -> None:
        self.run.log_metrics(logs, step=step)

    def on_validation(self, step: int, metrics: dict[str, float], grid: np.ndarray) -> None:
        gain = {"val_psnr_y_gain": metrics["val_psnr_y"] - self.baseline["bicubic_psnr_y"]}
        self.run.log_metrics({**metrics, **gain}, step=step)
        if grid is not None:
            self.run.log_image(grid, f"validation/step_{step:07d}.png")


class HistoryWriter(Callback):
    """Training curves as CSV for `dvc plots` (rewritten atomically at every log)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict[str, float]] = []

    def on_train_begin(self, cfg: Config, start_step: int, total_steps: int) -> None:
        if start_step and self.path.exists():  # keep the curve of the interrupted part
            with self.path.open() as f:
                self.rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)
                             if float(r["step"]) <= start_step]

    def _write(self) -> None:
        keys = sorted({k for r in self.rows for k in r}, key=lambda k: (k != "step", k))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(self.path)

    def on_log(self, step: int, logs: dict[str, float]) -> None:
        self.rows.append({"step": step, **logs})
        self._write()

    def on_validation(self, step: int, metrics: dict[str, float], grid: np.ndarray) -> None:
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update(metrics)
        else:
            self.rows.append({"step": step, **metrics})
        self._write()


def run_training(
    cfg: Config,
    data: TrainData,
    model_path: Path | None,
    ckpt_dir: Path | None = None,
    reports_dir: Path | None = None,
    callbacks: Sequence[Callback] = (),
    parent_run_id: str | None = None,
    run_name: str | None = None,
    extra_tags: dict[str, object] | None = None,
    exception_status: dict[type, str] | None = None,
) -> tuple[str, TrainResult]:
    """Train under an MLflow run (resumed if ``ckpt_dir`` remembers one); returns (run id, result).

    On success the generator is saved to ``model_path`` and logged as the run's artifact
    ``model/generator.keras``. A failure (e.g. a NaN loss) marks the run FAILED and re-raises.
    """
    state_path = Path(ckpt_dir) / "state.json" if ckpt_dir else None
    state = read_json(state_path, {}) if state_path else {}
    run = None
    if state.get("run_id"):
        run = tracking.resume_run(state["run_id"])
        if run is not None:
            log.info("continuing MLflow run %s", run.run_id)
    if run is None:
        run = tracking.start_run(
            cfg.tracking.experiment, run_name=run_name, parent_run_id=parent_run_id,
            tags={**tracking.config_tags(cfg, data.manifest_digest), "adv.loss": cfg.adv.loss,
                  **(extra_tags or {})},
        )
    if state_path is not None:
        write_json_atomic(state_path, {**read_json(state_path, {}), "run_id": run.run_id})
    baseline = data.baseline(cfg.preprocess.scale)
    cbs: list[Callback] = [MlflowCallback(run, baseline), *callbacks]
    if reports_dir is not None:
        cbs.append(HistoryWriter(Path(reports_dir) / "history.csv"))
    started = time.time()
    with tracking.run_context(run, exception_status):
        run.log_dict(cfg.to_dict(), "config/params.json")
        trainer, result = train(cfg, data, ckpt_dir, cbs)
        summary = {**baseline, **result.val, "train_seconds_this_session": time.time() - started,
                   "total_steps": result.total_steps, "resumed_from": result.resumed_from}
        run.log_metrics({"total_steps": result.total_steps}, step=result.step)  # for compare.py
        if model_path is not None:
            export_generator(trainer, model_path)
            run.log_artifact(model_path, "model")
        if reports_dir is not None:
            write_json_atomic(Path(reports_dir) / "train_summary.json", {"run_id": run.run_id, **summary})
            run.log_artifact(Path(reports_dir) / "history.csv", "train")
    return run.run_id, result
