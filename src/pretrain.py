"""Pretrain stage: the SRResNet (pixel MSE only, params ``pretrain.*``), one MLflow run.

    python src/pretrain.py [--params params.yaml] [--processed data/processed] [--model models/srresnet.keras]
                           [--checkpoints models/checkpoints] [--reports reports/pretrain]

Writes the generator, reports/pretrain/{history.csv,summary.json}; resumable state lives in
models/checkpoints/ (run the command again after an interruption to continue).
"""

from srgan import cli
from srgan.config import Config
from srgan.trainer import NonFiniteLossError, TrainStateError


def main(cfg: Config, args) -> None:
    from srgan import tracking
    from srgan.experiment import run_training
    from srgan.trainer import TrainData

    data = TrainData.load(args.processed, cfg.train.val_images)
    run_id, result = run_training(cfg, "pretrain", data, args.model, args.checkpoints, args.reports,
                                  run_name="srresnet")
    print(f"MLflow run {run_id}: " + " ".join(f"{k}={v:.4f}" for k, v in result.val.items()))
    if run_id:  # where `make ui` (or `mlflow ui`) shows it
        print(f"  {tracking.ui_link(cfg.tracking.experiment, run_id)}")


if __name__ == "__main__":
    cli.stage(main, __doc__, {"processed": "data/processed", "model": "models/srresnet.keras",
                              "checkpoints": "models/checkpoints", "reports": "reports/pretrain"},
              onednn=True, expected=(NonFiniteLossError, TrainStateError))
