"""The loss study: every arm (each adversarial objective and the control without one) x seeds, as
queued DVC experiments from the one pretrained generator, compared in reports/compare/index.html.

    python src/compare.py --run [--jobs N]     # make study: queue, run (adding seeds where needed), report
    python src/compare.py [--study STUDY_ID]   # rebuild a study's report from its MLflow runs
    python src/compare.py --mos [--crop 192]   # a blind rating session of the study (then mos.py serve)
    python src/compare.py --promote eval/valid/niqe   # `champion` = the registered generator best by it

What runs comes from params.yaml ``study.*``; a study's report is rebuilt from the runs nested under
its MLflow parent run (never from today's params), with mean opinion scores once its rating
session has ratings.
"""

import subprocess
import time

from srgan import cli
from srgan.config import ROOT, Config

MOS_ROOT = ROOT / "mos"  # the rating session of study <id> lives in mos/<id>/


def main(cfg: Config, args) -> None:
    from srgan import dataio, metrics, report, study, tracking

    if args.promote:  # first: a bad metric name must not touch any report
        try:
            version = tracking.promote(cfg.tracking.experiment, args.promote, tracking.DEFAULT_MODEL_NAME,
                                       higher_is_better=metrics.higher_is_better(args.promote))
        except LookupError as exc:  # no such experiment, model or metric
            raise cli.UserError(f"--promote {args.promote}: {exc}") from None
        print(f"{tracking.DEFAULT_MODEL_NAME}@champion -> version {version} (best {args.promote})")
    study.close_dead_parents(cfg.tracking.experiment)
    stopped: dict[str, str] = {}
    if args.run:
        study.check_config(cfg)
        study_id = args.study or study.new_study_id()
        # the pretrained generator (and everything before it) first: every experiment then gets it
        # from DVC's run cache instead of training it again
        if subprocess.run(["dvc", "repro", "pretrain"], cwd=ROOT).returncode:
            raise cli.UserError("dvc repro pretrain failed: the study needs the pretrained generator first")
        started = time.time()
        parent_id, stopped = study.run_study(cfg, study_id, args.jobs)
        seconds = time.time() - started
    else:
        study_id = args.study or dataio.read_json(args.out / "study.json", {}).get("study")
        if not study_id:
            if args.promote:  # --promote alone (no study yet) only sets the alias
                return
            raise cli.UserError(f"no study yet in {args.out}: run `python src/compare.py --run` (make study)")
        parent = study.find_parent(cfg.tracking.experiment, study_id)
        parent_id, seconds = parent["run_id"], parent["metrics"].get("study_seconds")
        stopped = {k.removeprefix("study.stop."): v for k, v in parent["tags"].items() if k.startswith("study.stop.")}
    rows = study.rows_of(cfg.tracking.experiment, parent_id)
    mos_dir = MOS_ROOT / study_id
    if args.mos:
        st = study.prepare_mos(cfg, rows, args.processed / "valid", args.srresnet, mos_dir, study_id,
                               crop=args.crop, force=args.force)
        print(f"rating session of {study_id}: {len(st.stimuli)} stimuli in {mos_dir}; raters open the page of\n"
              f"  python src/mos.py serve --study {mos_dir}\nthen `python src/compare.py` puts MOS into the report")
    mos = study.mos_results(mos_dir, study_id) if mos_dir.is_dir() else None
    page = study.write_report(cfg, rows, args.out, args.processed / "valid", args.srresnet, study_id, seconds,
                              stopped, mos, force=args.force)
    study.log_to_parent(parent_id, args.out)
    if (args.out.parent / "index.html").exists():
        report.build(args.out.parent, cfg.flat())
    print(f"study {study_id}: {len(rows)} runs -> {page}")
    print(dataio.read_json(args.out / "study.json", {}).get("verdict", ""))


if __name__ == "__main__":
    import argparse

    from srgan.study import StudyError

    # --run / --study / --jobs next to the stage-style path options
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--run", action="store_true", help="queue and run the experiments first")
    extra.add_argument("--study", help="study id (default: new with --run, else the last one)")
    extra.add_argument("--jobs", type=int, default=0, help="experiments at once (default: study.jobs)")
    extra.add_argument("--mos", action="store_true", help="prepare a blind rating session of the study")
    extra.add_argument("--crop", type=int, default=192, help="--mos: HR side of the rated crops (0 = whole image)")
    extra.add_argument("--force", action="store_true",
                       help="replace a report that had more runs / an existing rating session")
    extra.add_argument("--promote", metavar="METRIC", help="set the champion alias by this run metric, "
                       "e.g. eval/valid/psnr_y (the evaluate stage's choice) or eval/valid/niqe (lower wins)")
    cli.stage(main, __doc__, {"out": "reports/compare", "processed": "data/processed",
                              "srresnet": "models/srresnet.keras"}, parents=[extra], expected=(StudyError,))
