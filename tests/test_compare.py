"""compare.py core on a real MLflow store holding runs with different adversarial losses."""

from srgan import compare, tracking


def _run(loss: str, psnr: float, *, trial: bool = False) -> str:
    tags = {"optuna.trial": "0"} if trial else {}
    run = tracking.start_run("srgan", run_name=f"{loss}-run", tags=tags)
    run.log_params({"adv.loss": loss, "loss.w_mse": 1.0, "loss.w_vgg": 0.01, "loss.w_adv": 0.001,
                    "vgg.layer": "block2_conv2"})
    run.log_metrics({"eval/valid/psnr_y": psnr, "eval/valid/ssim_y": 0.8, "eval/valid/bicubic_psnr_y": 30.0,
                     "eval/valid/bicubic_ssim_y": 0.79})
    run.end()
    return run.run_id


def test_compare_two_losses(mlflow_uri, tmp_path):
    a, b = _run("hinge", 31.0), _run("minimax", 30.5)
    _run("modified", 40.0, trial=True)  # tuning trials only with include_trials
    rows = compare.collect("srgan")
    assert [(r["adv.loss"], r["run_id"]) for r in rows] == [("hinge", a), ("minimax", b)]
    assert rows[0]["psnr_y_gain"] == 1.0 and rows[0]["source"] == "evaluate"
    assert len(compare.collect("srgan", include_trials=True)) == 3
    paths = compare.write(rows, tmp_path / "compare")
    md = paths["md"].read_text()
    assert "| hinge | 31.0000 | 0.8000 | hinge-run |" in md
    assert paths["csv"].read_text().count("\n") == 3 and paths["png"].stat().st_size > 1000
