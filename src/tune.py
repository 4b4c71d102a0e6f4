"""Optuna search over the Per-Pix loss weights (w_mse, w_vgg, w_adv) and adv.loss.

    python src/tune.py [--n-trials N] [--timeout S] [--study-name NAME] [--storage URL] [--workers K]
    python src/tune.py --apply            # write reports/tune/best_params.yaml into params.yaml

The search space and per-trial budget live in params.yaml (`tune:`). The study persists (default:
optuna/journal.log), so running the command again adds trials to the same study. Each trial is a
nested MLflow run under one parent run per session. --storage postgresql://user@host/db lets
workers on several machines share one study.
"""

import argparse
import contextlib
import logging
import subprocess
import sys
from pathlib import Path

from srgan import cli, config, distribute
from srgan.config import ROOT

log = logging.getLogger("tune")


def parse_args() -> argparse.Namespace:
    ap = cli.parser(__doc__)
    ap.add_argument("--n-trials", type=int, help="trials to add in this call (default: tune.n_trials)")
    ap.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    ap.add_argument("--study-name", default="srgan-perpix")
    ap.add_argument("--storage", help="journal file path or RDB URL (default: optuna/journal.log)")
    ap.add_argument("--workers", type=int, default=1, help="processes on this machine")
    ap.add_argument("--processed", default=str(ROOT / "data/processed"))
    ap.add_argument("--srresnet", default=str(ROOT / "models/srresnet.keras"),
                    help="the pretrain stage's SRResNet every trial starts from")
    ap.add_argument("--pretrain-reports", default=str(ROOT / "reports/pretrain"))
    ap.add_argument("--out", default=str(ROOT / "reports/tune"))
    ap.add_argument("--apply", action="store_true", help="apply best_params.yaml to params.yaml and exit")
    ap.add_argument("--parent-run-id", help=argparse.SUPPRESS)  # set for worker processes
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    cli.setup_logging()
    cfg = config.load(args.params)
    cli.use_onednn(cfg.train.onednn)  # before TensorFlow is imported; worker processes inherit it
    from srgan import tune

    if args.apply:
        import yaml

        best = yaml.safe_load((Path(args.out) / "best_params.yaml").read_text())["params"]
        for line in tune.apply_to_params(best, Path(args.params)):
            print(line)
        return
    if args.workers < 1:
        raise cli.UserError(f"--workers: {args.workers} must be >= 1")
    if args.storage and args.storage.startswith("sqlite") and args.workers > 1:
        raise cli.UserError("--storage sqlite:// is not safe for parallel workers; use a journal file or PostgreSQL")
    n_trials = cfg.tune.n_trials if args.n_trials is None else args.n_trials
    if n_trials < 1:
        raise cli.UserError(f"--n-trials: {n_trials} must be >= 1")
    from srgan import dataio
    from srgan.dataio import SUMMARY_NAME

    pre = dataio.read_json(Path(args.pretrain_reports) / SUMMARY_NAME, None)
    if not Path(args.srresnet).is_file() or not pre:
        raise cli.UserError(f"{args.srresnet} (and {args.pretrain_reports}/{SUMMARY_NAME}) missing: every trial "
                            "starts from the pretrain stage's SRResNet; run `dvc repro pretrain` first")
    from srgan import tracking

    tracking.ensure_store()  # create the MLflow schema once, before any parallel writer
    parent = None
    if args.parent_run_id is None:
        parent = tracking.start_run(cfg.tracking.experiment, run_name=f"tune-{args.study_name}",
                                    tags={"optuna.study": args.study_name, "kind": "tune",
                                          "optuna.worker": tracking.process_id(), "srresnet.run_id": pre.get("run_id")})
        parent.log_params({"study_name": args.study_name, "n_trials": n_trials, "workers": args.workers,
                           **cfg.flat(("tune",))})
    parent_id = args.parent_run_id or parent.run_id
    ctx = tracking.run_context(parent) if parent else contextlib.nullcontext()
    with ctx:
        # create the study once before workers start (they then only load it)
        tune.open_study(cfg, args.study_name, args.storage)
        if args.workers > 1:
            _spawn_workers(args, n_trials, parent_id)
        else:
            from srgan.trainer import TrainData

            data = TrainData.load(Path(args.processed), cfg.train.val_images)  # once per process
            tune.run_study(cfg, data, args.study_name, args.storage, n_trials, args.timeout, parent_id,
                           Path(args.srresnet), int(pre.get("total_steps", 0)))
        if parent:
            study = tune.open_study(cfg, args.study_name, args.storage)
            paths = tune.write_outputs(study, cfg, Path(args.out))
            for p in paths.values():
                parent.log_artifact(p, "tune")
            _report(study, paths)


def _spawn_workers(args: argparse.Namespace, n_trials: int, parent_id: str) -> None:
    """K processes on this machine, each adding its share of trials to the same study."""
    shares = [n_trials // args.workers + (i < n_trials % args.workers) for i in range(args.workers)]
    procs = []
    for share in shares:
        if share == 0:
            continue
        cmd = [sys.executable, __file__, "--params", args.params, "--n-trials", str(share),
               "--study-name", args.study_name, "--processed", args.processed, "--out", args.out,
               "--srresnet", args.srresnet, "--pretrain-reports", args.pretrain_reports,
               "--parent-run-id", parent_id]
        if args.storage:
            cmd += ["--storage", args.storage]
        if args.timeout:
            cmd += ["--timeout", str(args.timeout)]
        procs.append(subprocess.Popen(cmd, env=distribute.threads_env(args.workers)))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise cli.UserError(f"tune workers exited with codes {codes}")


def _report(study, paths: dict) -> None:
    from optuna.trial import TrialState

    counts = {s.name.lower(): sum(t.state == s for t in study.trials) for s in TrialState}
    print(f"study {study.study_name}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    if "best" in paths:
        print(paths["best"].read_text())


if __name__ == "__main__":
    cli.run_main(main)
