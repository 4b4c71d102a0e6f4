"""The one SRGAN training loop: MSE pre-training, then adversarial Per-Pix training.

``train()`` is used by the train stage and by every tuning trial; they differ only in config and
callbacks. State (generator, discriminator, three optimizers, global step) is checkpointed so that a
killed run continues from its last checkpoint; the data position is the global step, because the
input pipeline is deterministic for a seed and is skipped ahead on resume.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .config import Config
from .fsutil import read_json, write_json_atomic

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf: training stops instead of producing a silent NaN model."""


@dataclass
class TrainData:
    """Everything training reads, loaded once per process (tuning reuses it across trials)."""

    shard_dir: Path
    valid: list[tuple[str, np.ndarray, np.ndarray]]  # (name, lr uint8, hr uint8)
    manifest_digest: str | None = None
    _baselines: dict[int, dict[str, float]] = field(default_factory=dict, repr=False)

    def baseline(self, scale: int) -> dict[str, float]:
        """Bicubic PSNR-Y/SSIM-Y of the validation images, computed once per process."""
        if scale not in self._baselines:
            self._baselines[scale] = bicubic_baseline(self.valid, scale)
        return self._baselines[scale]

    @classmethod
    def load(cls, processed_dir: Path, val_images: int = 0) -> "TrainData":
        from . import pipeline

        processed_dir = Path(processed_dir)
        manifest = read_json(processed_dir / "manifest.json")
        if manifest is None:
            raise FileNotFoundError(
                f"{processed_dir / 'manifest.json'} is missing: run the preprocess stage first (dvc repro)"
            )
        valid = pipeline.load_valid(processed_dir, limit=val_images)
        if not valid:
            raise FileNotFoundError(f"no validation images under {processed_dir / 'valid'}")
        return cls(processed_dir / "train", valid, manifest.get("digest"))


@dataclass
class TrainResult:
    step: int
    total_steps: int
    resumed_from: int
    val: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


class Callback:
    """Hooks of the loop. Raise from a hook to stop training (e.g. optuna.TrialPruned)."""

    def on_train_begin(self, cfg: Config, start_step: int, total_steps: int) -> None: ...

    def on_log(self, step: int, logs: dict[str, float]) -> None: ...

    def on_validation(self, step: int, metrics: dict[str, float], grid: np.ndarray) -> None: ...

    def on_checkpoint(self, step: int) -> None: ...

    def on_train_end(self, result: TrainResult) -> None: ...


# device names -> the MirroredStrategy this process made for them (see make_strategy)
_MIRRORED: dict[tuple[str, ...], Any] = {}


def make_strategy(mode: str):
    """tf.distribute strategy for ``train.distribute``.

    ``none``: the default (no-op) strategy. ``auto``: MirroredStrategy over every visible GPU when
    there are more than one, else ``none``. ``mirrored``: MirroredStrategy over every visible GPU;
    without GPUs, over every logical CPU device (one replica per device: a CPU split with
    ``tf.config.set_logical_device_configuration`` before TensorFlow initialises, as the tests do).
    The global batch ``train.batch_size`` is split evenly across the replicas.

    One MirroredStrategy per process and device list, reused by every later Trainer (tuning trains
    many in one process): a second MirroredStrategy restarts TensorFlow's collective instance keys, and
    its all-reduces then collide with the first one's (``Shape mismatch in the collective instance``)
    as soon as the models differ in shape.
    """
    import tensorflow as tf

    if mode not in ("auto", "none", "mirrored"):
        raise ValueError(f"train.distribute: {mode!r} is not one of 'auto', 'none', 'mirrored'")
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if mode == "mirrored" or (mode == "auto" and len(gpus) > 1):
        devices = tuple(gpus or [d.name for d in tf.config.list_logical_devices("CPU")])
        if devices not in _MIRRORED:
            _MIRRORED[devices] = tf.distribute.MirroredStrategy(devices=list(devices))
        strategy = _MIRRORED[devices]
        log.info("train.distribute=%s: MirroredStrategy over %d replicas %s",
                 mode, strategy.num_replicas_in_sync, list(devices))
        return strategy
    return tf.distribute.get_strategy()  # the default (no-op) strategy


def lr_schedule(base: float, phase_steps: int, kind: str, cfg: Config):
    """Keras learning-rate schedule of one phase (its optimizer counts the phase's steps)."""
    import keras

    t = cfg.train
    if kind == "constant" or phase_steps == 0:
        return base
    if kind == "cosine":
        return keras.optimizers.schedules.CosineDecay(base, decay_steps=max(phase_steps, 1))
    every = t.lr_decay_every or max(phase_steps // 2, 1)
    return keras.optimizers.schedules.ExponentialDecay(
        base, decay_steps=every, decay_rate=t.lr_decay_factor, staircase=True
    )


def bicubic_baseline(valid: Sequence[tuple[str, np.ndarray, np.ndarray]], scale: int) -> dict[str, float]:
    """Mean PSNR-Y/SSIM-Y of bicubic upscaling on the validation images."""
    from . import images, metrics

    rows = [metrics.evaluate_pair(images.upscale_bicubic(lr, scale), hr, scale) for _, lr, hr in valid]
    return {f"bicubic_{k}": float(np.mean([r[k] for r in rows])) for k in ("psnr_y", "ssim_y")}


def image_grid(lr: np.ndarray, bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray) -> np.ndarray:
    """LR (nearest) | bicubic | SR | HR side by side, uint8."""
    s = hr.shape[0] // lr.shape[0]
    nearest = np.repeat(np.repeat(lr, s, axis=0), s, axis=1)
    sep = np.full((hr.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([nearest, sep, bicubic, sep, sr, sep, hr], axis=1)


class Trainer:
    """Builds models, optimizers and compiled steps under a distribution strategy."""

    def __init__(self, cfg: Config, data: TrainData, ckpt_dir: Path | None):
        import keras
        import tensorflow as tf

        from . import losses, models

        self.cfg, self.data = cfg, data
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        t = cfg.train
        self.scale = cfg.preprocess.scale
        keras.utils.set_random_seed(cfg.seed)
        if t.precision == "mixed_bfloat16":
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        else:
            keras.mixed_precision.set_global_policy("float32")
        self.strategy = make_strategy(t.distribute)
        self.replicas = self.strategy.num_replicas_in_sync
        if t.batch_size % self.replicas:
            raise ValueError(
                f"train.batch_size: {t.batch_size} is not divisible by the {self.replicas} replicas"
            )
        self.adv = losses.ADVERSARIAL[cfg.adv.loss]
        with self.strategy.scope():
            self.G = models.build_generator(cfg.model.generator, self.scale)
            dcfg = cfg.model.discriminator
            if self.adv.needs_gradient_penalty and dcfg.batch_norm:
                # BN mixes samples, so the per-sample gradient penalty is ill-defined (Gulrajani et
                # al. 2017 drop it from the critic): build the critic without BN for this loss.
                log.warning("adv.loss=%s: discriminator built without batch norm", cfg.adv.loss)
                dcfg = dataclasses.replace(dcfg, batch_norm=False)
            self.D = models.build_discriminator(dcfg, t.hr_patch)
            self.vgg = losses.build_vgg_extractor(cfg.vgg, cfg.seed) if cfg.loss.w_vgg > 0 else None
            self.opt_pre = keras.optimizers.Adam(lr_schedule(t.lr_pretrain, t.pretrain_steps, t.lr_schedule_pretrain, cfg), beta_1=t.adam_beta1)
            self.opt_g = keras.optimizers.Adam(lr_schedule(t.lr_gan, t.gan_steps, t.lr_schedule, cfg), beta_1=t.adam_beta1)
            self.opt_d = keras.optimizers.Adam(lr_schedule(t.lr_gan, t.gan_steps, t.lr_schedule, cfg), beta_1=t.adam_beta1)
            for opt, model in ((self.opt_pre, self.G), (self.opt_g, self.G), (self.opt_d, self.D)):
                opt.build(model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.gp_rng = tf.random.Generator.from_seed(cfg.seed)
        self.ckpt = tf.train.Checkpoint(
            generator=self.G, discriminator=self.D, opt_pretrain=self.opt_pre,
            opt_g=self.opt_g, opt_d=self.opt_d, step=self.step, gp_rng=self.gp_rng,
        )
        self.manager = (
            tf.train.CheckpointManager(self.ckpt, str(self.ckpt_dir), max_to_keep=2) if self.ckpt_dir else None
        )
        self._pretrain = self._compile(self._pretrain_replica)
        self._gan = self._compile(self._gan_replica)

    # -- compiled steps -----------------------------------------------------------------------
    def _compile(self, replica_fn: Callable):
        import tensorflow as tf

        strategy = self.strategy

        def step_fn(batch):
            per_replica = strategy.run(replica_fn, args=batch)
            # every part is already divided by the replica count: SUM gives the global-batch mean
            return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}

        return tf.function(step_fn, jit_compile=self.cfg.train.jit_compile, reduce_retracing=True)

    def _pretrain_replica(self, lr, hr):
        import tensorflow as tf

        from . import losses

        inv = 1.0 / self.replicas
        with tf.GradientTape() as tape:
            sr = tf.cast(self.G(lr, training=True), tf.float32)
            mse = losses.pixel_mse(hr, sr) * inv
        grads = tape.gradient(mse, self.G.trainable_variables)
        self.opt_pre.apply_gradients(zip(grads, self.G.trainable_variables))
        return {"g_mse": mse}

    def _gan_replica(self, lr, hr):
        import tensorflow as tf

        from . import losses

        cfg, inv = self.cfg, 1.0 / self.replicas
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            sr = tf.cast(self.G(lr, training=True), tf.float32)
            real = tf.cast(self.D(hr, training=True), tf.float32)
            fake = tf.cast(self.D(sr, training=True), tf.float32)
            d_adv = self.adv.d_loss(real, fake, label_smoothing=cfg.adv.label_smoothing)
            gp = tf.constant(0.0)
            if self.adv.needs_gradient_penalty:
                gp = losses.gradient_penalty(self.D, hr, tf.stop_gradient(sr), self.gp_rng)
            d_total = (d_adv + cfg.adv.gp_weight * gp) * inv
            parts = {"mse": losses.pixel_mse(hr, sr), "adv": self.adv.g_loss(real, fake)}
            parts["vgg"] = (
                losses.vgg_loss(self.vgg, hr, sr, cfg.vgg.feature_scale) if self.vgg is not None else tf.constant(0.0)
            )
            g_total = losses.per_pix_loss(parts, cfg.loss) * inv
        g_grads = g_tape.gradient(g_total, self.G.trainable_variables)
        d_grads = d_tape.gradient(d_total, self.D.trainable_variables)
        self.opt_d.apply_gradients(zip(d_grads, self.D.trainable_variables))
        self.opt_g.apply_gradients(zip(g_grads, self.G.trainable_variables))
        return {
            "g_total": g_total, "g_mse": parts["mse"] * inv, "g_vgg": parts["vgg"] * inv,
            "g_adv": parts["adv"] * inv, "d_loss": d_total, "d_gp": gp * inv,
            # D's belief that real / fake are real, as in TF-GAN's summaries
            "d_real": tf.reduce_mean(tf.sigmoid(real)) * inv, "d_fake": tf.reduce_mean(tf.sigmoid(fake)) * inv,
        }

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> tuple[dict[str, float], np.ndarray]:
        """Mean PSNR-Y/SSIM-Y of the generator on the validation images, and an image grid."""
        from . import images, inference, metrics

        ev = self.cfg.evaluate
        rows, grid = [], None
        for i, (_, lr, hr) in enumerate(self.data.valid):
            sr = inference.upscale(self.G, lr, self.scale, tile=ev.tile, overlap=ev.tile_overlap)
            rows.append(metrics.evaluate_pair(sr, hr, self.scale))
            if i == 0:
                grid = image_grid(lr, images.upscale_bicubic(lr, self.scale), sr, hr)
        return {f"val_{k}": float(np.mean([r[k] for r in rows])) for k in ("psnr_y", "ssim_y", "psnr_rgb")}, grid

    # -- checkpoints --------------------------------------------------------------------------
    def restore(self) -> int:
        """Restore the latest checkpoint if any; returns the step to continue from."""
        if self.manager is None or self.manager.latest_checkpoint is None:
            return 0
        self.ckpt.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        return int(self.step.numpy())

    def save(self, step: int) -> None:
        if self.manager is not None:
            self.step.assign(step)
            # CheckpointManager updates its index file last: an interrupted save leaves the
            # previous checkpoint as the latest, never a half-written one.
            self.manager.save(checkpoint_number=step)


def _check_finite(step: int, logs: dict[str, float]) -> None:
    bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"step {step}: non-finite loss {bad}; training stopped. Lower train.lr_pretrain/train.lr_gan "
            f"or the adversarial weight loss.w_adv, or try another adv.loss."
        )


def train(
    cfg: Config,
    data: TrainData,
    ckpt_dir: Path | None = None,
    callbacks: Sequence[Callback] = (),
    stop_after: int | None = None,
) -> tuple[Trainer, TrainResult]:
    """Run (or resume) both phases; returns the trainer (with its generator) and a result.

    ``ckpt_dir`` holds the resumable state; a checkpoint made under a different config is moved
    aside rather than resumed. ``stop_after`` ends early after that many steps of this call (tests).
    """
    from . import pipeline

    t = cfg.train
    total = t.pretrain_steps + t.gan_steps
    if ckpt_dir is not None:
        ckpt_dir = Path(ckpt_dir)
        state = read_json(ckpt_dir / "state.json", {})
        if state.get("config_digest") not in (None, training_digest(cfg, data)):
            stale = ckpt_dir.with_name(ckpt_dir.name + f".stale-{int(time.time())}")
            log.warning("checkpoints in %s were made with other params; moved to %s", ckpt_dir, stale)
            shutil.move(str(ckpt_dir), stale)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(ckpt_dir / "state.json", {**read_json(ckpt_dir / "state.json", {}),
                                                    "config_digest": training_digest(cfg, data)})
    trainer = Trainer(cfg, data, ckpt_dir)
    start = trainer.restore()
    if start:
        log.info("resumed from checkpoint at step %d of %d", start, total)
    for cb in callbacks:
        cb.on_train_begin(cfg, start, total)

    result = TrainResult(step=start, total_steps=total, resumed_from=start)
    ds = pipeline.train_dataset(
        data.shard_dir, t.batch_size, t.hr_patch, cfg.preprocess.scale, cfg.seed, start_step=start
    )
    it = iter(trainer.strategy.experimental_distribute_dataset(ds))
    tick, tick_step, window = time.perf_counter(), start, []
    step = start
    for step in range(start, total):
        if stop_after is not None and step - start >= stop_after:
            break
        batch = next(it)
        fn = trainer._pretrain if step < t.pretrain_steps else trainer._gan
        logs = {k: float(v) for k, v in fn(batch).items()}
        _check_finite(step + 1, logs)
        window.append(logs)
        done = step + 1
        at_phase_end = done in (t.pretrain_steps, total)
        if done % t.log_every == 0 or at_phase_end:
            now = time.perf_counter()
            rate = (done - tick_step) / max(now - tick, 1e-9)
            tick, tick_step = now, done
            mean = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
            window = []
            opt = trainer.opt_pre if done <= t.pretrain_steps else trainer.opt_g
            mean.update({"lr": float(opt.learning_rate), "steps_per_s": rate,
                         "phase": 1.0 if done <= t.pretrain_steps else 2.0})
            eta = (total - done) / max(rate, 1e-9)
            log.info("step %d/%d phase %d %s | %.2f steps/s | ETA %s", done, total, int(mean["phase"]),
                     " ".join(f"{k}={v:.4g}" for k, v in mean.items() if k.startswith(("g_", "d_"))),
                     rate, time.strftime("%H:%M:%S", time.gmtime(eta)))
            result.history.append({"step": done, **mean})
            for cb in callbacks:
                cb.on_log(done, mean)
        if done % t.val_every == 0 or done == total:
            val, grid = trainer.validate()
            result.val = val
            log.info("step %d validation %s", done, " ".join(f"{k}={v:.4f}" for k, v in val.items()))
            for cb in callbacks:
                cb.on_validation(done, val, grid)
        if done % t.checkpoint_every == 0 or at_phase_end:
            trainer.save(done)
            for cb in callbacks:
                cb.on_checkpoint(done)
        result.step = done
    if result.step == total and not result.val:  # resumed at the very end: still report metrics
        result.val, grid = trainer.validate()
        for cb in callbacks:
            cb.on_validation(total, result.val, grid)
    if result.step == total:
        for cb in callbacks:
            cb.on_train_end(result)
    return trainer, result


def training_digest(cfg: Config, data: TrainData) -> str:
    """Digest of everything that shapes the trained weights (resume only under the same one)."""
    import hashlib
    import json

    d = cfg.to_dict()
    keep = {k: d[k] for k in ("seed", "model", "loss", "vgg", "adv")}
    keep["train"] = {k: v for k, v in d["train"].items()
                     if k not in ("log_every", "val_every", "checkpoint_every", "val_images", "onednn")}
    keep["scale"] = cfg.preprocess.scale
    keep["data"] = data.manifest_digest
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def export_generator(trainer: Trainer, path: Path) -> Path:
    """Save the generator as a .keras file atomically (temp name, then rename)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.keras")
    trainer.G.save(tmp)
    os.replace(tmp, path)
    return path


def summarize(history: list[dict[str, Any]]) -> dict[str, float]:
    """Last logged value of every series (for reports)."""
    out: dict[str, float] = {}
    for row in history:
        out.update({k: v for k, v in row.items() if k != "step"})
    return out
