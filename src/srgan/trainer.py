"""SRGAN training: the steps of each phase, their resumable state, and the one training loop.

Two phases, each its own DVC stage and MLflow run, as in Ledig et al. 2017:

* ``pretrain``: the SRResNet, pixel MSE only (``pretrain.*``) -> models/srresnet.keras;
* ``gan``: the adversarial Per-Pix phase (``gan.*``, ``loss.*``, ``adv.*``, ``vgg.*``),
  initialised from that SRResNet -> models/generator.keras.

:class:`Trainer` builds the models and exposes the compiled steps (``pretrain_step``,
``d_step``, ``gan_step``: each takes an ``(lr, hr)`` batch and returns a dict of float32 loss
parts); :class:`TrainState` owns everything resumable on disk; :func:`train` is the loop that the
train stages, every tuning trial and the study share (they differ only in config and callbacks).
The data position is the step: the input pipeline is deterministic for a seed and skips ahead.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from . import dataio, images
from .config import JIT_DISTRIBUTED_WHY, Config, PhaseConfig
from .images import Pair
from .state import TrainState

log = logging.getLogger(__name__)

Phase = Literal["pretrain", "gan"]
PHASES: tuple[Phase, ...] = ("pretrain", "gan")
# What each phase reads from params.yaml. dvc.yaml lists exactly these for the pretrain and train
# stages (tests/test_dvc_deps.py checks it); the resume digest is made of them.
PHASE_PARAMS: dict[str, tuple[str, ...]] = {
    "pretrain": ("seed", "preprocess.scale", "model.generator", "train", "pretrain",
                 "evaluate.tile", "evaluate.tile_overlap", "evaluate.niqe", "tracking"),
    "gan": ("seed", "preprocess.scale", "model", "loss", "vgg", "adv", "train", "gan",
            "evaluate.tile", "evaluate.tile_overlap", "evaluate.niqe", "tracking"),
}
HEALTH_PATCHES = 32  # held-out patches per validation image on which D's health is measured


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf: training stops instead of producing a silent NaN model."""


class TrainStateError(RuntimeError):
    """The resumable state cannot be used (e.g. a generator file of another architecture)."""


@dataclass
class TrainData:
    """Everything training reads, loaded once per process (tuning reuses it across trials)."""

    shard_dir: Path
    valid: list[Pair]
    manifest_digest: str | None = None
    _baselines: dict[int, dict[str, float]] = field(default_factory=dict, repr=False)

    def baseline(self, scale: int) -> dict[str, float]:
        """Bicubic PSNR-Y/SSIM-Y of the validation images, computed once per process."""
        from . import evaluate, metrics

        if scale not in self._baselines:
            means = metrics.mean_scores(evaluate.bicubic_scores(self.valid, metrics.Scorer(scale)))
            self._baselines[scale] = {f"bicubic_{k}": means[k] for k in ("psnr_y", "ssim_y")}
        return self._baselines[scale]

    @classmethod
    def load(cls, processed_dir: Path, val_images: int = 0) -> TrainData:
        """The shards and the first ``val_images`` validation pairs (0 = all) of data/processed."""
        processed_dir = Path(processed_dir)
        manifest = dataio.read_manifest(processed_dir)
        if not manifest:
            raise FileNotFoundError(
                f"{processed_dir / dataio.MANIFEST_NAME} is missing: run the preprocess stage first (dvc repro)"
            )
        valid = images.load_pairs(processed_dir / "valid", limit=val_images)
        return cls(processed_dir / "train", valid, manifest.get("digest"))


@dataclass
class TrainResult:
    phase: str
    step: int
    total_steps: int
    resumed_from: int
    val: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


class Callback:
    """Hooks of the loop. Raise from a hook to stop training (e.g. optuna.TrialPruned)."""

    def on_train_begin(self, cfg: Config, start_step: int, total_steps: int) -> None: ...

    def on_runtime(self, runtime: dict[str, str]) -> None:
        """What the process runs with (precision and why), once the trainer is built."""

    def on_log(self, step: int, logs: dict[str, float]) -> None: ...

    def on_validation(self, step: int, metrics: dict[str, float], grid: np.ndarray | None) -> None: ...


# --------------------------------------------------------------------------- runtime
def phase_seed(cfg: Config, phase: Phase) -> int:
    """The seed of a phase: ``gan.seed`` for the adversarial phase, the project seed otherwise."""
    return cfg.gan.seed if phase == "gan" else cfg.seed


@dataclass(frozen=True)
class Runtime:
    """What a training process runs with, decided once at its entry (:func:`prepare_runtime`) and
    passed down: the tf.distribute strategy, this process's cluster task, the precision and why."""

    strategy: Any
    task: Any  # distribute.Task
    precision: str
    precision_reason: str

    def tags(self) -> dict[str, str]:
        """For the run's tags: the precision chosen and why."""
        return {"precision": self.precision, "precision.reason": self.precision_reason}


def prepare_runtime(cfg: Config, phase: Phase = "pretrain") -> Runtime:
    """Process-wide settings a training run needs before any model is built: the cluster task and
    strategy (``train.distribute``), the seed of every RNG (Python, numpy, TF, Keras) and Keras'
    precision policy (``train.precision: auto`` decides per machine)."""
    import keras

    from . import distribute

    task = distribute.cluster_task(cfg.train.distribute)  # a bad TF_CONFIG is named before TF starts
    # first TF op: a multi-worker strategy configures TF's collectives, which must precede any other
    strategy = distribute.make_strategy(cfg.train.distribute)
    keras.utils.set_random_seed(phase_seed(cfg, phase))
    if cfg.train.deterministic:
        import tensorflow as tf

        # process-wide and one-way: GPU kernels become deterministic, ops without such a kernel raise
        tf.config.experimental.enable_op_determinism()
    policy, why = distribute.choose_precision(cfg.train.precision)
    keras.mixed_precision.set_global_policy(policy)
    return Runtime(strategy, task, policy, why)


def lr_schedule(phase: PhaseConfig, lr: float | None = None) -> Any:
    """Keras learning-rate schedule of one phase (its optimizer counts the phase's steps), starting
    at ``lr`` (default: the phase's ``lr``; the adversarial phase's D starts at ``gan.d_lr``)."""
    import keras

    lr = phase.lr if lr is None else lr
    if phase.lr_schedule == "constant" or phase.steps == 0:
        return lr
    if phase.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(phase.steps, 1))
    every = phase.lr_decay_every or max(phase.steps // 2, 1)
    return keras.optimizers.schedules.ExponentialDecay(
        lr, decay_steps=every, decay_rate=phase.lr_decay_factor, staircase=True
    )


# --------------------------------------------------------------------------- steps
class Trainer:
    """Models, optimizers and compiled steps of one phase, under the configured strategy.

    ``runtime``: from :func:`prepare_runtime` (strategy, seed, precision policy). ``init_generator`` (a .keras
    file, gan phase) sets the generator's weights after every network was built, so the
    discriminator's initialisation does not depend on where the generator came from.
    """

    def __init__(self, cfg: Config, phase: Phase, runtime: Runtime, init_generator: Path | None = None):
        import keras
        import tensorflow as tf

        from . import losses, models

        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.cfg, self.phase = cfg, phase
        self.phase_cfg: PhaseConfig = getattr(cfg, phase)
        t = cfg.train
        self.scale = cfg.preprocess.scale
        self.runtime = runtime
        self.strategy = runtime.strategy
        self.replicas = self.strategy.num_replicas_in_sync
        if t.batch_size % self.replicas:
            raise ValueError(f"train.batch_size: {t.batch_size} is not divisible by the {self.replicas} replicas")
        if t.jit_compile and self.replicas > 1:  # train.distribute: auto chose to mirror (config can't know)
            raise ValueError(f"train.jit_compile: true does not work with {self.replicas} replicas "
                             f"(train.distribute: {t.distribute}): {JIT_DISTRIBUTED_WHY['mirrored']}")
        # None: the control arm (adv.loss: none), the same phase without an adversarial term or D
        self.adv = losses.ADVERSARIAL.get(cfg.adv.loss)
        self.D = self.vgg = None
        with self.strategy.scope():
            self.G = models.build_generator(cfg.model.generator, self.scale)
            objects: dict[str, Any] = {"generator": self.G}
            if phase == "gan":
                self.vgg = losses.build_vgg_extractor(cfg.vgg, cfg.seed) if cfg.loss.w_vgg > 0 else None
                self.opt_g = keras.optimizers.Adam(lr_schedule(cfg.gan), beta_1=t.adam_beta1)
                self.opt_g.build(self.G.trainable_variables)
                objects["opt_g"] = self.opt_g
                if self.adv is not None:
                    dcfg = cfg.model.discriminator
                    if self.adv.needs_gradient_penalty and dcfg.batch_norm:
                        # BN mixes samples, so the per-sample gradient penalty is ill-defined (Gulrajani et
                        # al. 2017 drop it from the critic): build the critic without BN for this loss.
                        log.warning("adv.loss=%s: discriminator built without batch norm", cfg.adv.loss)
                        dcfg = dcfg.model_copy(update={"batch_norm": False})
                    self.D = models.build_discriminator(dcfg, t.hr_patch)
                    self.opt_d = keras.optimizers.Adam(lr_schedule(cfg.gan, cfg.gan.d_lr), beta_1=t.adam_beta1)
                    self.opt_d.build(self.D.trainable_variables)
                    self.gp_rng = tf.random.Generator.from_seed(cfg.gan.seed)
                    objects.update(discriminator=self.D, opt_d=self.opt_d, gp_rng=self.gp_rng)
            else:
                self.opt_pre = keras.optimizers.Adam(lr_schedule(cfg.pretrain), beta_1=t.adam_beta1)
                self.opt_pre.build(self.G.trainable_variables)
                objects["opt_pretrain"] = self.opt_pre
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            # built last, so every other network's initialisation is the same with or without it
            self.G_ema = (models.build_generator(cfg.model.generator, self.scale)
                          if phase == "gan" and cfg.gan.ema_decay > 0 else None)
            if self.G_ema is not None:
                objects["generator_ema"] = self.G_ema
        if init_generator is not None:
            self.load_generator_weights(init_generator)
        if self.G_ema is not None:
            self.G_ema.set_weights(self.G.get_weights())
        self.checkpoint = tf.train.Checkpoint(step=self.step, **objects)
        if phase == "gan":
            self.gan_step = self._compile(self._gan_replica, self._update_ema if self.G_ema is not None else None)
            # a D-only update (the benchmark times it); the control arm has no D to update
            self.d_step = self._compile(self._d_replica) if self.D is not None else None
        else:
            self.pretrain_step = self._compile(self._pretrain_replica)

    @property
    def total_steps(self) -> int:
        return self.phase_cfg.steps

    @property
    def step_fn(self) -> Callable[[Any], dict[str, Any]]:
        """The training step of this trainer's phase."""
        return self.gan_step if self.phase == "gan" else self.pretrain_step

    @property
    def optimizer(self) -> Any:
        """The generator's optimizer of this phase (its learning rate is logged)."""
        return self.opt_g if self.phase == "gan" else self.opt_pre

    def _compile(self, replica_fn: Callable, after: Callable[[], None] | None = None) -> Callable:
        """``replica_fn`` on every replica, then ``after`` once in cross-replica context."""
        import tensorflow as tf

        strategy = self.strategy

        def step_fn(batch):
            per_replica = strategy.run(replica_fn, args=batch)
            # every part is already divided by the replica count: SUM gives the global-batch mean
            out = {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}
            if after is not None:
                after()
            return out

        return tf.function(step_fn, jit_compile=self.cfg.train.jit_compile, reduce_retracing=True)

    def _pretrain_replica(self, lr, hr):
        import tensorflow as tf

        from . import losses

        inv = 1.0 / self.replicas
        kind = self.cfg.pretrain.loss
        with tf.GradientTape() as tape:
            sr = tf.cast(self.G(lr, training=True), tf.float32)
            parts = {k: losses.PIXEL_LOSSES[k](hr, sr) * inv for k in dict.fromkeys(("mse", kind))}
        grads = tape.gradient(parts[kind], self.G.trainable_variables)
        self.opt_pre.apply_gradients(zip(grads, self.G.trainable_variables))
        return {f"g_{k}": v for k, v in parts.items()}  # MSE always: curves stay comparable

    def _d_losses(self, real, fake, hr, sr):
        import tensorflow as tf

        from . import losses

        acfg = self.cfg.adv
        d_adv = self.adv.d_loss(real, fake, label_smoothing=acfg.label_smoothing)
        pen = {"d_gp": tf.constant(0.0)}
        if self.adv.needs_gradient_penalty:
            pen["d_gp"] = losses.gradient_penalty(self.D, hr, tf.stop_gradient(sr), self.gp_rng)
        if acfg.r1_weight > 0:  # only then a part: the default's outputs stay as they were
            pen["d_r1"] = losses.r1_penalty(self.D, hr, tf.stop_gradient(sr))
        total = d_adv + acfg.gp_weight * pen["d_gp"] + acfg.r1_weight / 2 * pen.get("d_r1", 0.0)
        return total, pen

    def _discriminate(self, hr, sr):
        """D's outputs on real and generated images, seen as one batch: batch-norm then normalises
        with the statistics of the mix it must tell apart. (Separate real-only and fake-only batches
        normalise away exactly what differs between them, e.g. the SR's missing high-frequency energy,
        and the moving averages that judge single held-out images match neither: measured here, D
        then stays at chance on held-out patches while its training outputs drift apart.)"""
        import tensorflow as tf

        n = tf.shape(hr)[0]
        both = tf.cast(self.D(tf.concat([hr, tf.cast(sr, hr.dtype)], axis=0), training=True), tf.float32)
        return both[:n], both[n:]

    def _d_replica(self, lr, hr):
        """A D-only update: fakes from G's forward pass (no G gradients)."""
        import tensorflow as tf

        inv = 1.0 / self.replicas
        sr = tf.stop_gradient(tf.cast(self.G(lr, training=False), tf.float32))
        with tf.GradientTape() as tape:
            real, fake = self._discriminate(hr, sr)
            d_total, pen = self._d_losses(real, fake, hr, sr)
            d_total = d_total * inv
        grads = tape.gradient(d_total, self.D.trainable_variables)
        self.opt_d.apply_gradients(zip(grads, self.D.trainable_variables))
        return {"d_loss": d_total, **{k: v * inv for k, v in pen.items()}}

    def _gan_replica(self, lr, hr):
        import tensorflow as tf

        from . import losses

        cfg, inv = self.cfg, 1.0 / self.replicas
        out: dict[str, Any] = {}
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            sr = tf.cast(self.G(lr, training=True), tf.float32)
            parts = {"mse": losses.pixel_mse(hr, sr)}
            if cfg.loss.w_l1 > 0:
                parts["l1"] = losses.pixel_l1(hr, sr)
            parts["vgg"] = (
                losses.vgg_loss(self.vgg, hr, sr, cfg.vgg.feature_scale) if self.vgg is not None else tf.constant(0.0)
            )
            if self.D is not None:
                real, fake = self._discriminate(hr, sr)
                d_total, pen = self._d_losses(real, fake, hr, sr)
                d_total = d_total * inv
                parts["adv"] = self.adv.g_loss(real, fake)
                out = {"d_loss": d_total, **{k: v * inv for k, v in pen.items()},
                       # D's belief that real / fake are real, as in TF-GAN's summaries
                       "d_real": tf.reduce_mean(tf.sigmoid(real)) * inv,
                       "d_fake": tf.reduce_mean(tf.sigmoid(fake)) * inv}
            g_total = losses.per_pix_loss(parts, cfg.loss) * inv
        g_grads = g_tape.gradient(g_total, self.G.trainable_variables)
        if self.D is not None:
            d_grads = d_tape.gradient(d_total, self.D.trainable_variables)
            self.opt_d.apply_gradients(zip(d_grads, self.D.trainable_variables))
        self.opt_g.apply_gradients(zip(g_grads, self.G.trainable_variables))
        return {"g_total": g_total, **{f"g_{k}": v * inv for k, v in parts.items()}, **out}

    def _update_ema(self) -> None:
        """G_ema <- decay * G_ema + (1 - decay) * G for the weights G learns; the others (batch-norm
        statistics) are copied, as BasicSR's model_ema does. Cross-replica context: every replica holds
        the same synchronised G, and the assignment updates every replica's copy."""
        d = self.cfg.gan.ema_decay
        for avg, w in zip(self.G_ema.trainable_variables, self.G.trainable_variables):
            avg.assign(d * avg + (1.0 - d) * w)
        for avg, w in zip(self.G_ema.non_trainable_variables, self.G.non_trainable_variables):
            avg.assign(w)

    @property
    def generator(self) -> Any:
        """The generator this phase validates and exports: G's moving average (``gan.ema_decay`` > 0)
        or G itself."""
        return self.G_ema if self.G_ema is not None else self.G

    # -- generator in and out ------------------------------------------------------------------
    def load_generator_weights(self, path: Path) -> None:
        """Set G's weights from a saved generator of the same architecture (model.generator)."""
        from . import models

        src = models.load_generator(path)
        mine, theirs = self.G.get_weights(), src.get_weights()
        if len(mine) != len(theirs) or any(a.shape != b.shape for a, b in zip(mine, theirs)):
            raise TrainStateError(
                f"{path} does not have the architecture of model.generator {self.cfg.model.generator.model_dump()}: "
                "re-run the pretrain stage (dvc repro pretrain)")
        self.G.set_weights(theirs)

    def current_lr(self) -> float:
        """G's learning rate now. A constant rate is a variable, mirrored under a replicated
        strategy (``float`` of a MirroredVariable fails); a schedule gives a tensor."""
        import keras

        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    def export_generator(self, path: Path) -> Path:
        """Save the phase's generator (:attr:`generator`) as a .keras file atomically."""
        from . import models

        return models.save_generator(self.generator, path)

    # -- validation ----------------------------------------------------------------------------
    def validate(self, pairs: Sequence[Pair]) -> tuple[dict[str, float], np.ndarray | None]:
        """Every registered image metric of the generator on ``pairs`` (the evaluate stage's scorer,
        tiles and float32 arithmetic: with ``train.val_images: 0`` the figures are the evaluate
        stage's), D's health on held-out patches of them (adversarial phase), and the first image's grid."""
        from . import images, inference, metrics, models, viz

        ev = self.cfg.evaluate
        generator = self.generator if self.runtime.precision == "float32" else models.float32_copy(self.generator)
        rows, outputs, grid = [], [], None
        for i, p in enumerate(pairs):
            sr = inference.upscale(generator, p.lr, self.scale, tile=ev.tile, overlap=ev.tile_overlap)
            rows.append(self._scorer().score(sr, p))
            outputs.append(sr)
            if i == 0:
                grid = viz.image_grid(p.lr, images.upscale_bicubic(p.lr, self.scale), sr, p.hr)
        val = metrics.mean_scores(rows)
        if self.D is not None:
            val.update(self.d_health(pairs, outputs))
        return {metrics.val_key(k): v for k, v in val.items()}, grid

    def d_health(self, pairs: Sequence[Pair], outputs: Sequence[np.ndarray]) -> dict[str, float]:
        """D on real HR patches of held-out images and on the generator's 8-bit output at the same
        places (``metrics.d_health``: accuracy, AUC and gap in the objective's own terms)."""
        from . import metrics

        p, s = self.cfg.train.hr_patch, self.scale
        real, fake = [], []
        for i, (pair, sr) in enumerate(zip(pairs, outputs)):
            h, w = pair.hr.shape[:2]
            if h < p or w < p:
                continue
            rng = np.random.default_rng(i)  # the same places at every validation of every run
            for _ in range(HEALTH_PATCHES):
                y, x = (int(rng.integers(0, (n - p) // s + 1)) * s for n in (h, w))
                real.append(pair.hr[y:y + p, x:x + p])
                fake.append(sr[y:y + p, x:x + p])
        if not real:
            return {}
        real_out, fake_out = self._judge(np.stack(real).astype("float32") / 255.0,
                                         np.stack(fake).astype("float32") / 255.0)
        return metrics.d_health(real_out, fake_out, self.adv.verdict)

    def _judge(self, real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """D's verdict per image on held-out patches, as D works in training: a batch of
        ``train.batch_size`` real and as many generated patches at a time (batch-norm normalises
        with that batch's statistics, which the moving averages only approximate), without
        changing any of D's state. A patch D's logits are averaged over positions, as its loss does."""
        n = self.cfg.train.batch_size
        outs: list[np.ndarray] = []
        for i in range(0, len(real), n):
            r, f = real[i:i + n], fake[i:i + n]
            both, _ = self.D.stateless_call(self.D.trainable_variables, self.D.non_trainable_variables,
                                            np.concatenate([r, f]), training=True)
            both = np.asarray(both, np.float64).reshape(len(r) + len(f), -1).mean(axis=1)
            outs.append(both)
        real_out = np.concatenate([o[:len(o) // 2] for o in outs])
        fake_out = np.concatenate([o[len(o) // 2:] for o in outs])
        return real_out, fake_out

    def _scorer(self) -> Any:
        """The evaluate stage's scorer (NIQE model loaded once); without NIQE when none is available."""
        if not hasattr(self, "_scorer_cache"):
            from . import metrics, niqe
            from .config import shared_root

            try:
                self._scorer_cache = metrics.Scorer.from_config(self.cfg.evaluate, self.scale,
                                                                shared_root() / "data" / "downloads")
            except niqe.NiqeError as exc:
                log.warning("validation without NIQE: %s", exc)
                self._scorer_cache = metrics.Scorer(self.scale)
        return self._scorer_cache


# --------------------------------------------------------------------------- the loop
def _check_finite(step: int, logs: dict[str, float]) -> None:
    bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"step {step}: non-finite loss {bad}; training stopped. Lower pretrain.lr / gan.lr "
            f"or the adversarial weight loss.w_adv, or try another adv.loss."
        )


def _check_same_training(trainer: Trainer, task: Any, state: TrainState | None, start: int) -> None:
    """Multi-worker: every worker must train the same params/data/initial generator (the state's
    digest) from the same checkpoint, or the replicas would silently diverge."""
    from . import distribute

    if task.num_workers < 2:
        return
    mine = {"resume step": start, "params digest": int(state.digest[:12], 16) if state is not None else 0}
    seen = distribute.across_workers(trainer.strategy, task, mine,
                                     "It happened before training started (the workers were comparing their state).")
    (lo, hi), (dlo, dhi) = seen["resume step"], seen["params digest"]
    folder = state.dir if state is not None else "the checkpoint folder"
    if dlo != dhi:
        raise distribute.ClusterError(
            f"train.distribute=multi_worker: the workers do not train the same thing ({task.name} has "
            f"{folder}): every worker needs the same params.yaml, data/processed and initial generator")
    if lo != hi:
        raise distribute.ClusterError(
            f"train.distribute=multi_worker: the workers found different checkpoints (steps {lo} to {hi}; "
            f"{task.name}: {start} in {folder}): every worker resumes from the chief's checkpoints, so "
            "the checkpoint folder must be on storage all machines share (or a copy of the chief's)")


def _resume_hint(state: TrainState | None, step: int, total: int) -> str:
    """Where a stopped multi-worker training is and how it continues."""
    done = state.checkpoints() if state is not None else []
    where = (f"the last checkpoint (step {done[0]} in {state.dir})" if done and state is not None
             else "step 0 (no checkpoint yet)")
    return (f"Training stopped at step {step} of {total}; run the same command on every worker again "
            f"to continue from {where}.")


def train(
    cfg: Config,
    phase: Phase,
    data: TrainData,
    state: TrainState | None = None,
    callbacks: Sequence[Callback] = (),
    init_generator: Path | None = None,
    data_offset: int = 0,
    runtime: Runtime | None = None,
) -> tuple[Trainer, TrainResult]:
    """Run (or resume, from ``state``) one phase; returns the trainer (with its generator) and a result.
    ``runtime``: the caller's :func:`prepare_runtime` (made here when this is the entry point).

    ``data_offset``: batches of the input stream already used by an earlier phase (the gan phase
    continues the stream where pre-training stopped instead of seeing its first batches again).
    """
    from . import distribute, pipeline

    runtime = runtime or prepare_runtime(cfg, phase)
    log.info("precision %s (%s)", runtime.precision, runtime.precision_reason)
    trainer = Trainer(cfg, phase, runtime, init_generator=init_generator)
    total = trainer.total_steps
    start = state.restore(trainer) if state is not None else 0
    task = runtime.task
    _check_same_training(trainer, task, state, start)
    if start:
        log.info("resumed from checkpoint at step %d of %d", start, total)
    for cb in callbacks:
        cb.on_train_begin(cfg, start, total)
        cb.on_runtime(runtime.tags())

    t = cfg.train
    result = TrainResult(phase=phase, step=start, total_steps=total, resumed_from=start)

    def worker_input(ctx: Any) -> Any:
        # one input pipeline per worker: its own records of every global batch (no two workers
        # train on the same crops; together exactly the one-process batch), split into consecutive
        # per-replica batches for the worker's replicas (GPUs)
        ds = pipeline.train_dataset(data.shard_dir, t.batch_size, t.hr_patch, cfg.preprocess.scale,
                                    phase_seed(cfg, phase), start_step=data_offset + start,
                                    num_shards=ctx.num_input_pipelines, shard_index=ctx.input_pipeline_id,
                                    cache_bytes=t.cache_mb * pipeline.MB)
        per_replica = ctx.get_per_replica_batch_size(t.batch_size)
        return ds if per_replica == t.batch_size // ctx.num_input_pipelines else ds.rebatch(per_replica, drop_remainder=True)

    it = iter(trainer.strategy.distribute_datasets_from_function(worker_input))
    tick, tick_step, window = time.perf_counter(), start, []
    step_fn = trainer.step_fn
    for step in range(start, total):
        try:
            logs = {k: float(v) for k, v in step_fn(next(it)).items()}
        except Exception as exc:  # a dead peer worker: a clear message instead of TF's collective error
            lost = distribute.worker_lost(exc, task, _resume_hint(state, step, total))
            if lost is None:
                raise
            raise lost from exc
        done = step + 1
        _check_finite(done, logs)
        window.append(logs)
        if done % t.log_every == 0 or done == total:
            now = time.perf_counter()
            rate = (done - tick_step) / max(now - tick, 1e-9)
            tick, tick_step = now, done
            mean = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
            window = []
            mean.update({"lr": trainer.current_lr(), "steps_per_s": rate})
            eta = (total - done) / max(rate, 1e-9)
            log.info("%s step %d/%d %s | %.2f steps/s | ETA %s", phase, done, total,
                     " ".join(f"{k}={v:.4g}" for k, v in mean.items() if k.startswith(("g_", "d_"))),
                     rate, time.strftime("%H:%M:%S", time.gmtime(eta)))
            result.history.append({"step": done, **mean})
            for cb in callbacks:
                cb.on_log(done, mean)
        if done % t.val_every == 0 or done == total:
            result.val, grid = trainer.validate(data.valid)
            log.info("%s step %d validation %s", phase, done, " ".join(f"{k}={v:.4f}" for k, v in result.val.items()))
            for cb in callbacks:
                cb.on_validation(done, result.val, grid)
        if state is not None and (done % t.checkpoint_every == 0 or done == total):
            state.save(trainer, done)
        result.step = done
    if not result.val:  # resumed at the very end (or a 0-step phase): still report metrics
        result.val, grid = trainer.validate(data.valid)
        for cb in callbacks:
            cb.on_validation(total, result.val, grid)
    if (warning := d_health_warning(result.val)) is not None:
        log.warning(warning)
    return trainer, result


def d_health_warning(val: dict[str, float]) -> str | None:
    """What to say when the adversarial phase ended with a D that cannot tell real from fake."""
    from .metrics import D_SEPARATES, val_key

    acc = val.get(val_key("d_acc"))
    if acc is None or acc >= D_SEPARATES:
        return None
    return (f"the discriminator ended at held-out accuracy {acc:.2f} (< {D_SEPARATES}; 0.5 is chance): it barely "
            "tells real from generated images, so the adversarial term had little to teach. Train longer "
            "(gan.steps), give D its own rate (gan.d_lr) or weigh the term more (loss.w_adv).")
