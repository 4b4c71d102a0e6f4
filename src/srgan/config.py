"""Typed configuration: params.yaml -> nested dataclasses, validated.

This module is the only reader of params.yaml. Every error names the offending key
(dotted path) and what is allowed, e.g. ``train.batch_size: expected int, got 'x'``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

ROOT = Path(__file__).resolve().parents[2]
PARAMS_PATH = ROOT / "params.yaml"

ADV_LOSSES = (
    "minimax",
    "modified",
    "least_squares",
    "wasserstein_gp",
    "hinge",
    "relativistic_average",
)


class ConfigError(ValueError):
    """A params value is unknown, of the wrong type or out of range."""


def _rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    """Field metadata for a numeric range check."""
    return {"range": (lo, hi, lo_open)}


def _f(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    return field(default=default, metadata=_rng(lo, hi, lo_open=lo_open))


@dataclass
class Div2kConfig:
    base_url: str = "https://data.vision.ee.ethz.ch/cvl/DIV2K/"
    include_lr: bool = False


@dataclass
class CocoConfig:
    base_url: str = "http://images.cocodataset.org/zips/"
    train_archive: Literal["val2017", "train2017"] = "val2017"
    train_images: int = _f(800, 1)
    valid_images: int = _f(100, 1)


@dataclass
class DataConfig:
    source: Literal["sample", "div2k", "coco"] = "sample"
    div2k: Div2kConfig = field(default_factory=Div2kConfig)
    coco: CocoConfig = field(default_factory=CocoConfig)


@dataclass
class PreprocessConfig:
    scale: Literal[2, 3, 4] = 4
    hr_crop: int = _f(256, 8)
    crops_per_image: int = _f(16, 1)
    shard_size: int = _f(256, 1)
    valid_max_side: int = _f(0, 0)
    workers: int = _f(0, 0)


@dataclass
class GeneratorConfig:
    blocks: int = _f(8, 0)
    filters: int = _f(32, 1)
    batch_norm: bool = False
    bicubic_skip: bool = True
    upsampler: Literal["paper", "light"] = "light"


@dataclass
class DiscriminatorConfig:
    filters: int = _f(32, 1)
    dense: int = _f(256, 1)
    batch_norm: bool = True


@dataclass
class ModelConfig:
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


@dataclass
class LossConfig:
    w_mse: float = _f(1.0, 0.0)
    w_vgg: float = _f(0.01, 0.0)
    w_adv: float = _f(0.001, 0.0)


@dataclass
class VggConfig:
    layer: str = "block2_conv2"
    weights: Literal["imagenet", "random"] = "random"
    feature_scale: float = _f(12.75, 0.0, lo_open=True)


@dataclass
class AdvConfig:
    loss: Literal[ADV_LOSSES] = "modified"  # type: ignore[valid-type]
    gp_weight: float = _f(10.0, 0.0)
    label_smoothing: float = _f(0.0, 0.0, 0.5)


@dataclass
class TrainConfig:
    batch_size: int = _f(16, 1)
    hr_patch: int = _f(64, 4)
    pretrain_steps: int = _f(3000, 0)
    gan_steps: int = _f(40, 0)
    lr_pretrain: float = _f(5e-4, 0.0, lo_open=True)
    lr_gan: float = _f(1e-4, 0.0, lo_open=True)
    lr_schedule_pretrain: Literal["constant", "step", "cosine"] = "cosine"
    lr_schedule: Literal["constant", "step", "cosine"] = "step"
    lr_decay_every: int = _f(0, 0)
    lr_decay_factor: float = _f(0.1, 0.0, 1.0, lo_open=True)
    adam_beta1: float = _f(0.9, 0.0, 1.0)
    log_every: int = _f(25, 1)
    val_every: int = _f(500, 1)
    checkpoint_every: int = _f(100, 1)
    val_images: int = _f(4, 0)
    distribute: Literal["auto", "none", "mirrored"] = "auto"
    jit_compile: bool = False
    onednn: bool = True
    precision: Literal["float32", "mixed_bfloat16"] = "float32"


@dataclass
class EvaluateConfig:
    tile: int = _f(128, 0)
    tile_overlap: int = _f(24, 0)
    zoom: int = _f(64, 8)
    self_ensemble: bool = False


@dataclass
class TrackingConfig:
    experiment: str = "srgan"


@dataclass
class TuneConfig:
    n_trials: int = _f(8, 1)
    pretrain_steps: int = _f(150, 0)
    gan_steps: int = _f(60, 1)
    report_every: int = _f(30, 1)
    objectives: list[Literal["psnr_y", "ssim_y"]] = field(default_factory=lambda: ["psnr_y"])
    pruner: Literal["none", "median", "hyperband"] = "median"
    sampler: Literal["tpe", "random"] = "tpe"
    w_mse: list[float] = field(default_factory=lambda: [0.01, 10.0])
    w_vgg: list[float] = field(default_factory=lambda: [1e-4, 1.0])
    w_adv: list[float] = field(default_factory=lambda: [1e-5, 1e-2])
    losses: list[Literal[ADV_LOSSES]] = field(default_factory=lambda: list(ADV_LOSSES))  # type: ignore[valid-type]
    lr_gan: list[float] = field(default_factory=list)


@dataclass
class Config:
    seed: int = _f(42, 0)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    vgg: VggConfig = field(default_factory=VggConfig)
    adv: AdvConfig = field(default_factory=AdvConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    # -- conveniences ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested dicts (what params.yaml would hold)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        return flatten(self.to_dict())

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the whole config (the params digest)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys; lists become their JSON text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``; return it (ints accepted for floats)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        allowed = get_args(tp)
        # bool is an int subclass: never let `true` pass for 1
        if isinstance(value, bool) or value not in allowed:
            raise ConfigError(
                f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}"
            )
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; allowed keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        converted = _convert(value, hints[name], key)
        lo, hi, lo_open = fields[name].metadata.get("range", (None, None, False))
        if lo is not None and (converted < lo or (lo_open and converted == lo)):
            bound = f"> {lo}" if lo_open else f">= {lo}"
            raise ConfigError(f"{key}: {converted!r} is out of range; allowed: {bound}")
        if hi is not None and converted > hi:
            raise ConfigError(f"{key}: {converted!r} is out of range; allowed: <= {hi}")
        kwargs[name] = converted
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    """Cross-field checks that single-field ranges cannot express."""
    s = cfg.preprocess.scale
    if cfg.preprocess.hr_crop % s:
        raise ConfigError(f"preprocess.hr_crop: {cfg.preprocess.hr_crop} must be a multiple of preprocess.scale ({s})")
    if cfg.train.hr_patch % s:
        raise ConfigError(f"train.hr_patch: {cfg.train.hr_patch} must be a multiple of preprocess.scale ({s})")
    if cfg.train.hr_patch > cfg.preprocess.hr_crop:
        raise ConfigError(
            f"train.hr_patch: {cfg.train.hr_patch} is larger than preprocess.hr_crop ({cfg.preprocess.hr_crop})"
        )
    for name in ("w_mse", "w_vgg", "w_adv", "lr_gan"):
        rng = getattr(cfg.tune, name)
        if name == "lr_gan" and not rng:
            continue
        if len(rng) != 2 or not 0 < rng[0] <= rng[1]:
            raise ConfigError(f"tune.{name}: {rng!r} must be [low, high] with 0 < low <= high (log-uniform)")
    if not cfg.tune.objectives or len(set(cfg.tune.objectives)) != len(cfg.tune.objectives):
        raise ConfigError(f"tune.objectives: {cfg.tune.objectives!r} must list psnr_y and/or ssim_y once each")
    if not cfg.tune.losses:
        raise ConfigError("tune.losses: must name at least one adversarial loss")


def from_dict(data: dict[str, Any] | None) -> Config:
    """Build and validate a Config from a (partial) nested dict."""
    cfg = _build(Config, data or {})
    _check(cfg)
    return cfg


def load(path: str | Path = PARAMS_PATH, overrides: dict[str, Any] | None = None) -> Config:
    """Load params.yaml (plus dotted-key ``overrides``) into a validated Config."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating sections."""
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def replace(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with dotted-key overrides applied."""
    data = cfg.to_dict()
    for dotted, value in overrides.items():
        set_dotted(data, dotted, value)
    return from_dict(data)
