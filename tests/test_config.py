"""params.yaml -> typed config: every bad value is refused with the key named."""

import pytest
import yaml

from srgan import config
from srgan.config import ConfigError


def test_params_yaml_is_the_only_place_with_defaults():
    cfg = config.load()
    # a partial config is an overlay on params.yaml: an empty one is params.yaml itself
    assert config.from_dict({}).to_dict() == cfg.to_dict()
    # the models declare types and ranges, never values: every field is required
    def required(model):
        for name, f in model.model_fields.items():
            assert f.is_required(), f"{model.__name__}.{name} has a default"
            tp = f.annotation
            if isinstance(tp, type) and issubclass(tp, config.Section):
                required(tp)
    required(config.Config)
    # so a key missing from params.yaml is an error naming it
    raw = yaml.safe_load(config.PARAMS_PATH.read_text())
    del raw["train"]["batch_size"]
    with pytest.raises(ConfigError, match="train.batch_size: missing"):
        config.validate(raw)


def test_every_params_key_has_a_comment():
    for line in config.PARAMS_PATH.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"params.yaml line without a one-line comment: {line!r}"


def test_resume_safe_keys_come_from_the_schema():
    assert config.resume_safe_keys() == {"train.log_every", "train.val_every", "train.checkpoint_every",
                                         "train.val_images", "train.onednn", "train.cache_mb"}


def test_training_runs_log_training_sections_only():
    keys = config.load().run_params()
    assert "loss.w_adv" in keys and "pretrain.steps" in keys
    assert not any(k.startswith(("tune.", "data.", "tracking.")) for k in keys)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"train.batch_size": "16"}, "train.batch_size: expected an integer"),
        ({"train.batch_size": 0}, "train.batch_size: 0 is out of range"),
        ({"train.batch_size": True}, "train.batch_size: expected an integer"),
        ({"adv.loss": "wgan"}, "adv.loss: 'wgan' is not allowed; allowed values: 'minimax'"),
        ({"train.bogus": 1}, "train.bogus: unknown key; allowed keys under train:"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"preprocess.scale": 8}, "preprocess.scale: 8 is not allowed; allowed values: 2, 3, 4"),
        ({"gan.lr": 0}, "gan.lr: 0.0 is out of range; allowed: > 0.0"),
        ({"adv.label_smoothing": 0.9}, "adv.label_smoothing: 0.9 is out of range; allowed: <= 0.5"),
        ({"model.generator.batch_norm": "yes"}, "model.generator.batch_norm: expected true or false"),
        ({"train.hr_patch": 98}, "train.hr_patch: 98 must be a multiple of preprocess.scale"),
        ({"train.hr_patch": 512}, "train.hr_patch: 512 is larger than preprocess.hr_crop"),
        ({"tune.w_mse": [1.0]}, "tune.w_mse: [1.0] must be [low, high]"),
        ({"tune.losses": ["hinge", "nope"]}, "tune.losses[1]: 'nope' is not allowed"),
        ({"tune.seeds": [42, 43, 42]}, "tune.seeds: [42, 43, 42] must list each seed once"),
        ({"data": 3}, "data: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        config.load(overrides=override)
    assert message in str(exc.value)
    assert str(config.PARAMS_PATH) in str(exc.value)  # and the file


def test_ints_accepted_for_floats_and_flat_keys():
    cfg = config.replace(config.load(), {"loss.w_mse": 2})
    assert cfg.loss.w_mse == 2.0 and isinstance(cfg.loss.w_mse, float)
    flat = cfg.flat()
    assert flat["loss.w_mse"] == 2.0 and flat["adv.loss"] == "modified"
    assert cfg.digest() != config.load().digest()


def test_broken_yaml_is_reported(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(p)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")


def test_readme_paper_recipes_are_valid_params():
    """Every `-S key=value` of the SRGAN and ESRGAN paper commands (docs/RECIPES.md, linked from the
    README) names a real param with a valid value, and the recipes say what the papers did."""
    import re

    assert "docs/RECIPES.md" in (config.ROOT / "README.md").read_text()
    section = (config.ROOT / "docs" / "RECIPES.md").read_text() + "\n\n"
    blocks = re.findall(r"    dvc exp run (.*?)\n\n", section, re.S)
    assert len(blocks) == 2, blocks
    cfgs = []
    for block in blocks:
        sets = dict(re.findall(r"-S ([\w.]+)=(\S+)", block))
        assert len(sets) >= 20 and sets["model.generator.upsampler"] == "paper"
        cfgs.append(config.load(overrides={k: yaml.safe_load(v) for k, v in sets.items()}))  # DVC parses YAML
    srgan, esrgan = cfgs
    assert srgan.model.generator.arch == "srresnet" and srgan.model.generator.blocks == 16
    assert srgan.model.generator.batch_norm and srgan.vgg.weights == "imagenet" and srgan.pretrain.steps == 10**6
    assert esrgan.model.generator.arch == "rrdb" and esrgan.model.generator.blocks == 23
    assert esrgan.adv.loss == "relativistic_average" and esrgan.vgg.before_activation and esrgan.pretrain.loss == "l1"


def test_edit_params_keeps_comments_and_refuses_bad_values(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(config.PARAMS_PATH.read_text())
    changed = config.edit_params(p, {"loss.w_adv": 0.002, "adv.loss": "hinge"})
    assert changed == ["loss.w_adv: 0.0005 -> 0.002", "adv.loss: 'modified' -> 'hinge'"]
    text = p.read_text()
    assert "w_adv: 0.002" in text and "# Per-Pix weight of the adversarial loss" in text
    assert text.count("#") == config.PARAMS_PATH.read_text().count("#")  # every comment kept
    cfg = config.load(p)
    assert cfg.loss.w_adv == 0.002 and cfg.adv.loss == "hinge"
    before = p.read_text()
    with pytest.raises(ConfigError, match="adv.loss: 'wgan' is not allowed"):
        config.edit_params(p, {"adv.loss": "wgan"})
    with pytest.raises(ConfigError, match="loss.bogus: not found"):
        config.edit_params(p, {"loss.bogus": 1})
    assert p.read_text() == before  # a refused edit writes nothing


def test_shared_root_follows_dvc_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert config.shared_root() == tmp_path.resolve()
    monkeypatch.delenv("DVC_ROOT")
    assert config.shared_root() == config.ROOT
