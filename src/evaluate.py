"""Evaluate stage: bicubic, the SRResNet and the SRGAN on every evaluation set (PSNR-Y, SSIM-Y, ...).

    python src/evaluate.py [--params params.yaml] [--processed data/processed] [--benchmarks data/benchmarks]
                           [--srresnet models/srresnet.keras] [--model models/generator.keras] [--reports reports]

Writes reports/metrics.json, reports/per_image.csv, reports/eval/ and reports/index.html, and logs
each generator's numbers (``eval/<set>/<metric>``) to its MLflow run.
"""

import logging

from srgan import cli
from srgan.config import NO_ADVERSARIAL, Config


def main(cfg: Config, args) -> None:
    from srgan import dataio, evaluate, metrics, models, report, tracking
    from srgan.dataio import SUMMARY_NAME

    ev = cfg.evaluate
    if note := models.tile_overlap_warning(cfg.model.generator, cfg.preprocess.scale, ev.tile, ev.tile_overlap):
        logging.getLogger("evaluate").warning(note)
    reports = args.reports
    generators = {"srresnet": args.srresnet, "srgan": args.model}
    sets = {s: args.processed / "valid" if s == "valid" else args.benchmarks / s for s in cfg.evaluate.sets}
    # the discriminator's health at the end of the adversarial phase (measured on the validation images)
    trained = dataio.read_json(reports / "train" / SUMMARY_NAME, {})
    d_health = {m.name: trained[metrics.val_key(m.name)] for m in metrics.REGISTRY.values()
                if m.kind == metrics.DISCRIMINATOR and trained.get(metrics.val_key(m.name)) is not None}
    summary = evaluate.evaluate(cfg.evaluate, cfg.preprocess.scale, generators, sets, reports,
                                niqe_dir=args.benchmarks / "niqe", trained_on_valid={"srgan": d_health})
    page = report.build(reports, cfg.flat())
    for method, stage in (("srresnet", "pretrain"), ("srgan", "train")):
        run_id = dataio.read_json(reports / stage / SUMMARY_NAME, {}).get("run_id")
        if run_id:
            tracking.log_to_run(run_id, evaluate.run_metrics(summary, method),
                                [reports / "metrics.json", reports / "per_image.csv", page], "eval")
        if run_id and method == "srgan" and cfg.adv.loss == NO_ADVERSARIAL:
            # the control arm is no SRGAN: by PSNR-Y alone it would win `champion` from every one
            print(f"not registered: adv.loss {NO_ADVERSARIAL} (the control arm) trains no adversarial generator")
        elif run_id and method == "srgan":
            # the registry holds every evaluated SRGAN; `champion` is the best by validation PSNR-Y
            version = tracking.register_model(run_id, tracking.DEFAULT_MODEL_NAME)
            champion = tracking.promote(cfg.tracking.experiment, "eval/valid/psnr_y", tracking.DEFAULT_MODEL_NAME)
            print(f"registered {tracking.DEFAULT_MODEL_NAME} version {version}; champion: version {champion}")
    for name in cfg.evaluate.sets:
        v = summary[name]
        niqe = {m: v[m].get("niqe") for m in ("bicubic", "srresnet", "srgan")}
        logging.getLogger("evaluate").info(
            "%s PSNR-Y: bicubic %.2f, SRResNet %.2f (%+.2f), SRGAN %.2f (%+.2f) dB%s", name,
            v["bicubic"]["psnr_y"], v["srresnet"]["psnr_y"], v["srresnet"]["psnr_y_gain"],
            v["srgan"]["psnr_y"], v["srgan"]["psnr_y_gain"],
            "" if None in niqe.values() else "; NIQE " + ", ".join(f"{m} {x:.2f}" for m, x in niqe.items()))
    print(f"report: {page}")


if __name__ == "__main__":
    cli.stage(main, __doc__, {"processed": "data/processed", "benchmarks": "data/benchmarks",
                              "srresnet": "models/srresnet.keras", "model": "models/generator.keras",
                              "reports": "reports"})
