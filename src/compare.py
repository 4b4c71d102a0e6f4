"""Compare the runs of an MLflow experiment by adversarial loss and Per-Pix weights.

    python src/compare.py [--experiment srgan] [--include-trials] [--out reports/compare]

Writes reports/compare/runs.{md,csv,png} and refreshes reports/index.html if it exists.
"""

from pathlib import Path

from srgan import cli, config
from srgan.config import ROOT


def main() -> None:
    ap = cli.parser(__doc__)
    ap.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    ap.add_argument("--include-trials", action="store_true", help="also list tune.py trials")
    ap.add_argument("--out", default=str(ROOT / "reports/compare"))
    args = ap.parse_args()
    cli.setup_logging()
    cfg = config.load(args.params)
    from srgan import compare, report

    exp = args.experiment or cfg.tracking.experiment
    rows = compare.collect(exp, include_trials=args.include_trials)
    if not rows:
        raise cli.UserError(f"no finished runs with metrics in MLflow experiment '{exp}'")
    paths = compare.write(rows, Path(args.out))
    print(paths["md"].read_text())
    reports = Path(args.out).parent
    if (reports / "index.html").exists():
        report.build(reports, cfg.flat())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    cli.run_main(main)
