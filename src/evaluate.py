"""Evaluate stage: PSNR/SSIM (Y, BT.601) of the generator vs bicubic on every validation image.

    python src/evaluate.py [--params params.yaml]

Writes reports/metrics.json, reports/per_image.csv, reports/eval/*.png and reports/index.html,
and logs the same numbers to the model's MLflow run.
"""

import logging
from pathlib import Path

from srgan import cli, config
from srgan.config import ROOT
from srgan.fsutil import read_json


def main() -> None:
    ap = cli.parser(__doc__)
    ap.add_argument("--model", default=str(ROOT / "models/generator.keras"))
    ap.add_argument("--processed", default=str(ROOT / "data/processed"))
    ap.add_argument("--reports", default=str(ROOT / "reports"))
    args = ap.parse_args()
    cli.setup_logging()
    cfg = config.load(args.params)

    from srgan import evaluate, report, tracking

    reports = Path(args.reports)
    result = evaluate.evaluate(cfg, Path(args.model), Path(args.processed), reports)
    summary = result["summary"]
    run_id = read_json(reports / "train" / "train_summary.json", {}).get("run_id")
    if run_id:
        tracking.log_to_run(run_id, {f"eval_{k}": v for k, v in summary.items()},
                            [reports / "metrics.json", reports / "per_image.csv"], "eval")
    page = report.build(reports, cfg.flat())
    if run_id:
        tracking.log_to_run(run_id, {}, [page], "report")
    logging.getLogger("evaluate").info(
        "PSNR-Y %.2f dB (bicubic %.2f, gain %+.2f), SSIM-Y %.4f (bicubic %.4f); report: %s",
        summary["psnr_y"], summary["bicubic_psnr_y"], summary["psnr_y_gain"], summary["ssim_y"],
        summary["bicubic_ssim_y"], page)


if __name__ == "__main__":
    cli.run_main(main)
