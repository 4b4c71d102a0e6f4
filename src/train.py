"""Train stage: the adversarial Per-Pix phase (``gan.*``, ``loss.*``, ``adv.*``, ``vgg.*``), initialised
from the pretrain stage's SRResNet as in the paper; one MLflow run.

    python src/train.py [--params params.yaml] [--processed data/processed] [--srresnet models/srresnet.keras]
                        [--pretrain-reports reports/pretrain] [--model models/generator.keras]
                        [--checkpoints models/checkpoints] [--reports reports/train]

Writes the SRGAN generator and reports/train/{history.csv,summary.json}; resumable like pretrain.
"""

from srgan import cli
from srgan.config import Config
from srgan.trainer import NonFiniteLossError, TrainStateError


def main(cfg: Config, args) -> None:
    from srgan import dataio
    from srgan.dataio import SUMMARY_NAME
    from srgan.experiment import run_training
    from srgan.trainer import TrainData

    pre = dataio.read_json(args.pretrain_reports / SUMMARY_NAME, None)
    if not args.srresnet.is_file() or not pre:
        raise cli.UserError(f"{args.srresnet} or {args.pretrain_reports / SUMMARY_NAME} is missing: "
                            "run the pretrain stage first (dvc repro pretrain)")
    data = TrainData.load(args.processed, cfg.train.val_images)
    run_id, result = run_training(
        cfg, "gan", data, args.model, args.checkpoints, args.reports, run_name=f"srgan-{cfg.adv.loss}",
        extra_tags={"srresnet.run_id": pre.get("run_id")}, init_generator=args.srresnet,
        data_offset=int(pre.get("total_steps", 0)))
    from srgan import tracking

    print(f"MLflow run {run_id}: " + " ".join(f"{k}={v:.4f}" for k, v in result.val.items()))
    if run_id:  # where `make ui` (or `mlflow ui`) shows it
        print(f"  {tracking.ui_link(cfg.tracking.experiment, run_id)}")


if __name__ == "__main__":
    cli.stage(main, __doc__, {"processed": "data/processed", "srresnet": "models/srresnet.keras",
                              "pretrain_reports": "reports/pretrain", "model": "models/generator.keras",
                              "checkpoints": "models/checkpoints", "reports": "reports/train"},
              onednn=True, expected=(NonFiniteLossError, TrainStateError))
