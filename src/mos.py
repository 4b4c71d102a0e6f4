"""Mean opinion score study: prepare stimuli, serve the blind rating app, compute results.

    python src/mos.py prepare [--model NAME=PATH.keras | NAME=runs:/RUN_ID | NAME=models:/MODEL@ALIAS ...]
                              [--crop SIZE] [--images N]
    python src/mos.py serve   [--host 127.0.0.1] [--port 8000] [--study mos/study] [--db PATH]
    python src/mos.py results [--study mos/study] [--db PATH] [--out reports] [--no-mlflow] [--version STUDY_ID]

Ratings go to mos/ratings.sqlite (beside the study) unless --db says otherwise; results writes
reports/mos.{json,md,png} and refreshes reports/index.html if it exists. Re-preparing a study while
the app serves it is safe: the app switches to the new version and refuses the old stimuli (410),
and the ratings database keeps every served version, so `results --version ID` reports an earlier one. The logic lives in the
``srgan.mos`` package; this file only parses arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from srgan import cli, config, quiet
from srgan.mos import db as mos_db
from srgan.mos import study as mos_study

DEFAULT_STUDY = config.ROOT / "mos" / "study"


def _prepare(args: argparse.Namespace) -> None:
    cfg = config.load(args.params)
    tile, overlap = cfg.evaluate.tile, cfg.evaluate.tile_overlap
    models = [mos_study.model_method(spec, tile, overlap) for spec in args.model]
    mos_study.prepare_study(args.valid, args.study, models, crop=args.crop, images=args.images,
                            seed=cfg.seed if args.seed is None else args.seed, force=args.force,
                            context=max(mos_study.CONTEXT_LR, overlap))


def _serve(args: argparse.Namespace) -> None:
    from srgan.mos.app import serve

    serve(args.study, args.db, host=args.host, port=args.port)


def _results(args: argparse.Namespace) -> None:
    from srgan.mos import results
    from srgan.mos.app import default_db

    db_path = args.db or default_db(args.study)
    if args.version:  # an earlier version, as the rating app recorded it when it served it
        meta = mos_db.load_study_meta(db_path, args.version)
        if meta is None:
            raise mos_study.StudyError(f"{db_path}: no study version {args.version!r} was served with these ratings")
        st = mos_study.study_from_meta(args.study, meta, f"{db_path} (study {args.version})")
    else:
        st = mos_study.load_study(args.study)
    # No database beside the study just means nobody has rated yet; a --db that names a missing
    # file is a mistake and load_ratings says so.
    ratings = [] if args.db is None and not db_path.exists() else mos_db.load_ratings(db_path, st.study_id)
    others = {} if not db_path.exists() else {
        v: n for v, n in mos_db.ratings_per_study(db_path).items() if v != st.study_id}
    res = results.compute(st, ratings)
    paths = results.write_reports(res, args.out)
    for name, m in res["methods"].items():
        mos = "   –" if m["mos"] is None else f"{m['mos']:.2f}"
        print(f"  {name:>16}: MOS {mos}  (n={m['n']})")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    if res["n_ratings"] == 0:
        print("note: no ratings yet for this study")
    for version, n in others.items():  # ratings given before the study was re-prepared
        print(f"note: {n} rating(s) belong to study version {version}: `python src/mos.py results "
              f"--version {version}` reports them")
    if not args.no_mlflow:
        results.log_to_runs(res, paths)
    if (Path(args.out) / "index.html").exists():
        from srgan import report

        report.build(Path(args.out), config.load(args.params).flat())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=str(config.PARAMS_PATH))
    sub = p.add_subparsers(dest="cmd", required=True)

    pp = sub.add_parser("prepare", help="build a rating study")
    pp.add_argument("--model", action="append", default=[], metavar="NAME=PATH_OR_URI",
                    help="a model to rate (repeatable): a .keras file, an MLflow run's generator "
                         "(runs:/RUN_ID) or a registered version (models:/MODEL@ALIAS, models:/MODEL/VERSION)")
    pp.add_argument("--crop", type=int, default=0, metavar="SIZE",
                    help="HR side of a centered crop, same box for every method (0 = whole image)")
    pp.add_argument("--images", type=int, default=0, metavar="N", help="validation images to use (0 = all)")
    pp.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study folder to write")
    pp.add_argument("--valid", type=Path, default=config.ROOT / "data" / "processed" / "valid",
                    help="folder with hr/ and lr/ validation PNGs")
    pp.add_argument("--seed", type=int, default=None, help="image sampling seed (default: params seed)")
    pp.add_argument("--force", action="store_true", help="replace an existing study folder")
    pp.set_defaults(func=_prepare)

    ps = sub.add_parser("serve", help="run the rating web app")
    ps.add_argument("--host", default="127.0.0.1")
    ps.add_argument("--port", type=int, default=8000)
    ps.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    ps.add_argument("--db", type=Path, default=None, help="ratings sqlite (default: beside the study)")
    ps.set_defaults(func=_serve)

    pr = sub.add_parser("results", help="MOS, CIs, tests -> reports/mos.{json,md,png}")
    pr.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    pr.add_argument("--db", type=Path, default=None, help="ratings sqlite (default: beside the study)")
    pr.add_argument("--out", type=Path, default=config.ROOT / "reports")
    pr.add_argument("--no-mlflow", action="store_true", help="do not log MOS to the models' MLflow runs")
    pr.add_argument("--version", default=None, metavar="STUDY_ID",
                    help="an earlier version of the study (re-prepared since), as the rating app served it")
    pr.set_defaults(func=_results)

    for parser in (p, pp, ps, pr):  # `mos --verbose prepare` and `mos prepare --verbose` alike
        quiet.add_verbose_option(parser)
    args = p.parse_args(argv)
    cli.setup_logging()
    args.func(args)


if __name__ == "__main__":
    cli.run_main(main, expected=(mos_study.StudyError, mos_db.RatingsError))
