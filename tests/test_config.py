"""params.yaml -> typed config: every bad value is refused with the key named."""

import pytest
import yaml

from srgan import config
from srgan.config import ConfigError


def test_params_yaml_loads_with_defaults_matching_dataclasses():
    cfg = config.load()
    # the file holds every default: building from an empty dict gives the same values
    assert config.from_dict({}).to_dict() == cfg.to_dict()
    raw = yaml.safe_load(config.PARAMS_PATH.read_text())
    assert set(raw) == set(cfg.to_dict()), "params.yaml must list every section"
    for section, values in raw.items():
        if isinstance(values, dict):
            assert set(values) == set(cfg.to_dict()[section]), f"{section}: params.yaml and config differ"


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
        ({"train.lr_gan": 0}, "train.lr_gan: 0.0 is out of range; allowed: > 0.0"),
        ({"adv.label_smoothing": 0.9}, "adv.label_smoothing: 0.9 is out of range; allowed: <= 0.5"),
        ({"model.generator.batch_norm": "yes"}, "model.generator.batch_norm: expected true or false"),
        ({"train.hr_patch": 98}, "train.hr_patch: 98 must be a multiple of preprocess.scale"),
        ({"train.hr_patch": 512}, "train.hr_patch: 512 is larger than preprocess.hr_crop"),
        ({"tune.w_mse": [1.0]}, "tune.w_mse: [1.0] must be [low, high]"),
        ({"tune.losses": ["hinge", "nope"]}, "tune.losses[1]: 'nope' is not allowed"),
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


def test_readme_paper_recipe_is_valid_params():
    """Every `-S key=value` of the README's DIV2K paper command names a real param with a valid value."""
    import re

    readme = (config.ROOT / "README.md").read_text()
    block = readme.split("### The paper's recipe on DIV2K (GPU)")[1].split("\n\n(")[0]
    sets = dict(re.findall(r"-S ([\w.]+)=(\S+)", block))
    assert len(sets) >= 20 and sets["model.generator.upsampler"] == "paper"
    cfg = config.load(overrides={k: yaml.safe_load(v) for k, v in sets.items()})  # DVC parses values as YAML
    assert cfg.model.generator.blocks == 16 and cfg.model.generator.batch_norm
    assert cfg.vgg.weights == "imagenet" and cfg.train.pretrain_steps == 10**6
