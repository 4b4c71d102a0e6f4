"""The loss study: every adversarial objective x seeds (x generators), as queued DVC experiments
from the one pretrained generator, compared in reports/compare/index.html.

    python src/compare.py --run [--jobs N]     # make study: queue, run, collect, report
    python src/compare.py [--study STUDY_ID]   # rebuild the report of a study from MLflow
    python src/compare.py --promote eval/valid/niqe   # `champion` = the registered generator best by it
                                                      # (with or without a study)

What is compared comes from params.yaml ``study.*``; each cell's run is found in MLflow by the
digest of its training params, nested under the study's parent run, and shown side by side.
"""

import os
import subprocess
import time

from srgan import cli
from srgan.config import ROOT, Config


def main(cfg: Config, args) -> None:
    from srgan import dataio, metrics, report, study, tracking

    if args.run:
        study_id = args.study or study.new_study_id()
        # the pretrained generator (and everything before it) first: every experiment then gets it
        # from DVC's run cache instead of training it again
        out = subprocess.run(["dvc", "repro", "pretrain"], cwd=ROOT)
        if out.returncode:
            raise cli.UserError("dvc repro pretrain failed: the study needs the pretrained generator first")
        tracking.ensure_store()
        parent = tracking.start_run(cfg.tracking.experiment, run_name=study_id,
                                    tags={"kind": "study", "study": study_id})
        parent.log_params(cfg.flat(("study",)))
        started = time.time()
        with tracking.run_context(parent):
            exps = study.plan(cfg, study_id)
            jobs = args.jobs or cfg.study.jobs or max(1, (os.cpu_count() or 2) // 2)
            study.run_experiments(exps, jobs)
            rows = study.collect(cfg, exps, parent.run_id, study_id)
            seconds = time.time() - started
            page = study.write_report(cfg, rows, args.out, args.processed / "valid", args.srresnet,
                                      study_id, seconds)
            parent.log_metrics({"study_seconds": seconds, "runs": len(rows)})
            parent.log_artifacts(args.out, "compare")
        missing = len(exps) - len(rows)
        if missing:
            print(f"warning: {missing} of {len(exps)} experiments have no finished run (see `dvc queue status`)")
    else:
        study_id = args.study or dataio.read_json(args.out / "study.json", {}).get("study")
        if not study_id and not args.promote:
            raise cli.UserError(f"no study yet in {args.out}: run `python src/compare.py --run` (make study)")
        if study_id:  # --promote alone (no study yet) only sets the alias
            rows = study.collect(cfg, study.plan(cfg, study_id))
            page = study.write_report(cfg, rows, args.out, args.processed / "valid", args.srresnet, study_id)
    if args.promote:
        # every evaluated SRGAN is a version of the registered model
        try:
            version = tracking.promote(cfg.tracking.experiment, args.promote, tracking.DEFAULT_MODEL_NAME,
                                       higher_is_better=metrics.higher_is_better(args.promote))
        except LookupError as exc:  # no such experiment, model or metric
            raise cli.UserError(f"--promote {args.promote}: {exc}") from None
        print(f"{tracking.DEFAULT_MODEL_NAME}@champion -> version {version} (best {args.promote})")
    if (args.out.parent / "index.html").exists():
        report.build(args.out.parent, cfg.flat())
    if study_id:
        print(f"study {study_id}: {len(rows)} runs -> {page}")


if __name__ == "__main__":
    import argparse

    # --run / --study / --jobs next to the stage-style path options
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--run", action="store_true", help="queue and run the experiments first")
    extra.add_argument("--study", help="study id (default: new with --run, else the last one)")
    extra.add_argument("--jobs", type=int, default=0, help="experiments at once (default: study.jobs)")
    extra.add_argument("--promote", metavar="METRIC", help="set the champion alias by this run metric, "
                       "e.g. eval/valid/psnr_y (the evaluate stage's choice) or eval/valid/niqe (lower wins)")
    cli.stage(main, __doc__, {"out": "reports/compare", "processed": "data/processed",
                              "srresnet": "models/srresnet.keras"}, parents=[extra])
