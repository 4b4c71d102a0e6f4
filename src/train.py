"""Train stage: SRGAN (MSE pre-training, then Per-Pix adversarial training), one MLflow run.

    python src/train.py [--params params.yaml]

Reads data/processed; writes models/generator.keras, models/checkpoints/ (resumable),
reports/train/{history.csv,train_summary.json}. Run it again after an interruption to resume.
"""

from pathlib import Path

from srgan import cli, config
from srgan.config import ROOT


def main() -> None:
    ap = cli.parser(__doc__)
    ap.add_argument("--processed", default=str(ROOT / "data/processed"))
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--reports", default=str(ROOT / "reports/train"))
    args = ap.parse_args()
    cli.setup_logging()
    cfg = config.load(args.params)
    cli.use_onednn(cfg.train.onednn)  # before TensorFlow is imported

    from srgan.experiment import run_training
    from srgan.trainer import NonFiniteLossError, TrainData

    data = TrainData.load(Path(args.processed), cfg.train.val_images)
    models = Path(args.models)
    try:
        run_id, result = run_training(cfg, data, models / "generator.keras", models / "checkpoints",
                                      Path(args.reports))
    except NonFiniteLossError as exc:
        raise cli.UserError(str(exc)) from None
    print(f"MLflow run {run_id}: " + " ".join(f"{k}={v:.4f}" for k, v in result.val.items()))


if __name__ == "__main__":
    cli.run_main(main)
