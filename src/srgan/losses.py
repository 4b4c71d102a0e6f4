"""SRGAN losses: pixel MSE, VGG feature ("content") loss, adversarial family, Per-Pix total.

All losses return a float32 scalar: a mean over the batch (and pixels/features where relevant).
Adversarial losses work on raw logits / critic outputs and use numerically stable forms
(softplus instead of log(sigmoid)). They reimplement TF-GAN's losses, since tensorflow-gan
does not import on TF >= 2.16.

Identities used: log sigmoid(x) = -softplus(-x), log(1 - sigmoid(x)) = -softplus(x),
BCE(logit x, target t) = t * softplus(-x) + (1 - t) * softplus(x).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from srgan.config import ADV_LOSSES, LossConfig, VggConfig
from srgan.metrics import ranking_accuracy

# --------------------------------------------------------------------------- pixel


def pixel_mse(hr, sr):
    """Mean squared error over batch, pixels and channels."""
    hr = ops.cast(hr, "float32")
    sr = ops.cast(sr, "float32")
    return ops.mean(ops.square(hr - sr))


def pixel_l1(hr, sr):
    """Mean absolute error over batch, pixels and channels (EDSR's and ESRGAN's pixel loss)."""
    return ops.mean(ops.abs(ops.cast(hr, "float32") - ops.cast(sr, "float32")))


PIXEL_LOSSES = {"mse": pixel_mse, "l1": pixel_l1}


# --------------------------------------------------------------------------- VGG

# ImageNet BGR channel means of Keras' VGG19 "caffe" preprocessing.
VGG_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="srgan")
class VggPreprocess(layers.Layer):
    """[0, 1] RGB -> VGG19 caffe input: x*255, RGB->BGR, minus the ImageNet BGR mean."""

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype) * 255.0
        x = ops.flip(x, axis=-1)  # RGB -> BGR
        return x - ops.convert_to_tensor(VGG_BGR_MEAN, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


def _seeded_he_uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # He (not Glorot) scale keeps activation variance through ReLUs, so deep random layers
    # (block5_conv4 is the 16th conv) still give features of a useful magnitude.
    fan_in = int(np.prod(shape[:-1]))
    limit = np.sqrt(6.0 / fan_in)
    return rng.uniform(-limit, limit, size=shape).astype("float32")


def build_vgg_extractor(cfg: VggConfig, seed: int) -> keras.Model:
    """Frozen VGG19 truncated at ``cfg.layer``; input [0, 1] RGB of any size, output features.

    ``cfg.weights == 'imagenet'``: Keras downloads and caches the ImageNet weights (needs internet
    the first time). ``'random'``: He-uniform kernels drawn from numpy with ``seed`` (zero biases),
    so the same seed gives the same features on any machine, without touching global RNG state.
    ``cfg.before_activation`` (ESRGAN): the features of ``cfg.layer`` before its ReLU, which keep
    the sign and are denser than the rectified ones.
    """
    weights = "imagenet" if cfg.weights == "imagenet" else None
    vgg = keras.applications.VGG19(include_top=False, weights=weights, input_shape=(None, None, 3))
    names = [layer.name for layer in vgg.layers[1:]]
    if cfg.layer not in names:
        raise ValueError(f"vgg.layer: {cfg.layer!r} is not a VGG19 layer; allowed: {', '.join(names)}")

    inp = keras.Input(shape=(None, None, 3), name="rgb01")
    x = VggPreprocess(name="vgg_preprocess")(inp)
    rng = np.random.default_rng(seed)
    for layer in vgg.layers[1:]:
        if weights is None and isinstance(layer, layers.Conv2D):
            kernel, bias = layer.get_weights()
            layer.set_weights([_seeded_he_uniform(rng, kernel.shape), np.zeros_like(bias)])
        if layer.name == cfg.layer and cfg.before_activation and isinstance(layer, layers.Conv2D):
            # the same conv with its ReLU taken off (Keras fuses the activation into the conv)
            linear = layers.Conv2D.from_config({**layer.get_config(), "activation": "linear",
                                                "name": f"{layer.name}_linear"})
            x = linear(x)
            linear.set_weights(layer.get_weights())
            break
        x = layer(x)  # reuse the (built) VGG layers, stop at the requested one
        if layer.name == cfg.layer:
            break
    model = keras.Model(inp, x, name=f"vgg19_{cfg.layer}")
    model.trainable = False
    return model


def vgg_loss(extractor: keras.Model, hr, sr, feature_scale: float):
    """MSE between VGG features of HR and SR, each divided by ``feature_scale`` (paper: 12.75)."""
    f_hr = ops.cast(extractor(hr, training=False), "float32") / feature_scale
    f_sr = ops.cast(extractor(sr, training=False), "float32") / feature_scale
    return ops.mean(ops.square(ops.stop_gradient(f_hr) - f_sr))


# --------------------------------------------------------------------------- adversarial


def _f32(x):
    return ops.cast(x, "float32")


def _bce(logits, target: float):
    """Mean sigmoid cross-entropy of ``logits`` against a constant target in [0, 1]."""
    return ops.mean(target * ops.softplus(-logits) + (1.0 - target) * ops.softplus(logits))


def _minimax_d(real, fake, label_smoothing: float = 0.0):
    # One-sided smoothing (Salimans et al. 2016): real target 1 - s, fake target stays 0.
    # (TF-GAN smooths towards 1/2, i.e. target 1 - s/2; we use the paper's convention.)
    return _bce(_f32(real), 1.0 - label_smoothing) + _bce(_f32(fake), 0.0)


def _minimax_g(real, fake):
    # G minimises log(1 - D(G(z))): the negated fake half of D's loss (saturates early on).
    return -ops.mean(ops.softplus(_f32(fake)))


def _modified_g(real, fake):
    # Non-saturating: G minimises -log D(G(z)).
    return ops.mean(ops.softplus(-_f32(fake)))


def _least_squares_d(real, fake, label_smoothing: float = 0.0):
    real, fake = _f32(real), _f32(fake)
    return 0.5 * ops.mean(ops.square(real - 1.0)) + 0.5 * ops.mean(ops.square(fake))


def _least_squares_g(real, fake):
    return 0.5 * ops.mean(ops.square(_f32(fake) - 1.0))


def _wasserstein_d(real, fake, label_smoothing: float = 0.0):
    # Without the gradient penalty: the trainer adds gp_weight * gradient_penalty(...).
    return ops.mean(_f32(fake)) - ops.mean(_f32(real))


def _critic_g(real, fake):
    # Shared by wasserstein_gp and hinge: G maximises the critic's score on fakes.
    return -ops.mean(_f32(fake))


def _hinge_d(real, fake, label_smoothing: float = 0.0):
    real, fake = _f32(real), _f32(fake)
    return ops.mean(ops.relu(1.0 - real)) + ops.mean(ops.relu(1.0 + fake))


def _ragan_d(real, fake, label_smoothing: float = 0.0):
    # Relativistic average: "is real more realistic than the average fake?" (ESRGAN).
    real, fake = _f32(real), _f32(fake)
    return _bce(real - ops.mean(fake), 1.0) + _bce(fake - ops.mean(real), 0.0)


def _ragan_g(real, fake):
    # Symmetric to D; G gets gradients through both terms (needs D's real logits too).
    real, fake = _f32(real), _f32(fake)
    return _bce(fake - ops.mean(real), 1.0) + _bce(real - ops.mean(fake), 0.0)


# --- D's verdict in each objective's own terms (numpy; the held-out D-health metrics use these):
# (accuracy, gap) of D's outputs on real and on fake images.
def _sigmoid_np(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow


def _probability_verdict(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    # the sigmoid family: D's probability that an input is real, decided at 1/2
    p_real, p_fake = _sigmoid_np(real), _sigmoid_np(fake)
    return 0.5 * (np.mean(p_real > 0.5) + np.mean(p_fake < 0.5)), float(p_real.mean() - p_fake.mean())


def _least_squares_verdict(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    # regression onto the targets 1 (real) and 0 (fake): the nearer target is D's verdict
    return 0.5 * (np.mean(real > 0.5) + np.mean(fake < 0.5)), float(real.mean() - fake.mean())


def _margin_verdict(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    # hinge: the margins sit at +1 / -1, so the sign is the verdict
    return 0.5 * (np.mean(real > 0) + np.mean(fake < 0)), float(real.mean() - fake.mean())


def _critic_verdict(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    # a Wasserstein critic has no absolute level (only differences count): the share of
    # (real, fake) pairs it orders correctly, and its estimate of the distance (the critic gap)
    return ranking_accuracy(real, fake), float(real.mean() - fake.mean())


def _relativistic_verdict(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    # RaGAN: "is this real more realistic than the average fake?" (and vice versa)
    acc = 0.5 * (np.mean(real > fake.mean()) + np.mean(fake < real.mean()))
    return acc, float(_sigmoid_np(real - fake.mean()).mean() - _sigmoid_np(fake - real.mean()).mean())


@dataclass(frozen=True)
class AdvLoss:
    """One adversarial loss: D and G losses on raw logits, scalar means over the batch.

    ``d_loss(real_logits, fake_logits, label_smoothing=0.0)``, ``g_loss(real_logits, fake_logits)``.
    ``verdict(real, fake) -> (accuracy, gap)``: D's separation of numpy outputs in the objective's
    own terms (probability, target, margin, critic or relativistic), for the D-health metrics.
    ``needs_gradient_penalty``: the trainer must add ``gp_weight * gradient_penalty(...)`` to D's
    loss. ``uses_label_smoothing``: whether d_loss honours label_smoothing (others ignore it).
    """

    name: str
    d_loss: Callable[..., Any]
    g_loss: Callable[[Any, Any], Any]
    verdict: Callable[[np.ndarray, np.ndarray], tuple[float, float]]
    needs_gradient_penalty: bool = False
    uses_label_smoothing: bool = False


ADVERSARIAL: dict[str, AdvLoss] = {
    "minimax": AdvLoss("minimax", _minimax_d, _minimax_g, _probability_verdict, uses_label_smoothing=True),
    "modified": AdvLoss("modified", _minimax_d, _modified_g, _probability_verdict, uses_label_smoothing=True),
    "least_squares": AdvLoss("least_squares", _least_squares_d, _least_squares_g, _least_squares_verdict),
    "wasserstein_gp": AdvLoss("wasserstein_gp", _wasserstein_d, _critic_g, _critic_verdict,
                              needs_gradient_penalty=True),
    "hinge": AdvLoss("hinge", _hinge_d, _critic_g, _margin_verdict),
    "relativistic_average": AdvLoss("relativistic_average", _ragan_d, _ragan_g, _relativistic_verdict),
}
# The table and the config's allowed names must never drift apart.
assert tuple(ADVERSARIAL) == ADV_LOSSES, (tuple(ADVERSARIAL), ADV_LOSSES)


def _uniform(shape, seed_or_rng):
    """U(0, 1) samples from an int / [2]-int seed (stateless), a SeedGenerator or a tf Generator."""
    if isinstance(seed_or_rng, keras.random.SeedGenerator):
        return keras.random.uniform(shape, seed=seed_or_rng)
    if isinstance(seed_or_rng, tf.random.Generator):
        return seed_or_rng.uniform(shape)
    seed = tf.cast(tf.convert_to_tensor(seed_or_rng), tf.int64)
    if seed.shape.rank == 0:
        # Stateless: pass a per-step value (e.g. the step counter) to get fresh interpolates.
        seed = tf.stack([seed, tf.constant(0, tf.int64)])
    return tf.random.stateless_uniform(shape, seed=seed)


def gradient_penalty(discriminator: keras.Model, real, fake, seed_or_rng):
    """WGAN-GP penalty mean((||grad_x D(x_hat)||_2 - 1)^2), x_hat = a*real + (1-a)*fake, a~U(0,1).

    Unweighted: for ``wasserstein_gp`` the trainer adds ``cfg.adv.gp_weight * gradient_penalty(...)``
    to D's loss (kept out of ``ADVERSARIAL`` so every table entry is a function of logits only).
    Call it inside the trainer's GradientTape: the inner gradient stays differentiable.
    ``seed_or_rng``: int or int tensor (stateless; vary it per step), a [2] int seed,
    a ``keras.random.SeedGenerator`` or a ``tf.random.Generator``.
    """
    real = tf.cast(real, tf.float32)
    fake = tf.cast(fake, tf.float32)
    batch = tf.shape(real)[0]
    alpha = tf.cast(_uniform(tf.stack([batch, 1, 1, 1]), seed_or_rng), tf.float32)
    x_hat = alpha * real + (1.0 - alpha) * fake
    with tf.GradientTape() as tape:
        tape.watch(x_hat)
        scores = tf.cast(discriminator(x_hat, training=True), tf.float32)
    # d(sum of scores)/dx_hat is the per-sample gradient as long as samples are independent
    # (no BatchNorm in the critic, as WGAN-GP prescribes).
    grads = tape.gradient(scores, x_hat)
    axes = list(range(1, len(x_hat.shape)))
    # Small epsilon: sqrt'(0) is infinite, which would NaN the second-order gradient.
    norms = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=axes) + 1e-12)
    return tf.reduce_mean(tf.square(norms - 1.0))


def r1_penalty(discriminator: keras.Model, real, fake):
    """R1 penalty mean(||grad_x D(x)||_2^2) over the real images (Mescheder et al. 2018), unweighted:
    the trainer adds ``cfg.adv.r1_weight / 2 * r1_penalty(...)`` to D's loss, for any objective.

    D sees real and fake as one batch, as in its training step (batch norm then normalises with the
    mix's statistics, see ``Trainer._discriminate``); the gradient is taken w.r.t. the real half.
    Call it inside the trainer's GradientTape: the inner gradient stays differentiable.
    """
    real = tf.cast(real, tf.float32)
    fake = tf.cast(fake, tf.float32)
    n = tf.shape(real)[0]
    with tf.GradientTape() as tape:
        tape.watch(real)
        scores = tf.cast(discriminator(tf.concat([real, fake], axis=0), training=True), tf.float32)[:n]
    grads = tape.gradient(scores, real)
    return tf.reduce_mean(tf.reduce_sum(tf.square(grads), axis=list(range(1, len(real.shape)))))


# --------------------------------------------------------------------------- total

LOSS_PARTS = ("mse", "l1", "vgg", "adv")


def per_pix_loss(parts: Mapping[str, Any], cfg: LossConfig):
    """Per-Pix total: w_mse*mse + w_l1*l1 + w_vgg*vgg + w_adv*adv over the parts present in ``parts``.

    Missing parts count as 0 (e.g. the MSE-only pretraining phase passes only ``mse``).
    """
    unknown = sorted(set(parts) - set(LOSS_PARTS))
    if unknown:
        raise KeyError(f"per_pix_loss: unknown loss part(s) {unknown}; allowed: {', '.join(LOSS_PARTS)}")
    weights = {"mse": cfg.w_mse, "l1": cfg.w_l1, "vgg": cfg.w_vgg, "adv": cfg.w_adv}
    total = ops.convert_to_tensor(0.0, dtype="float32")
    for name, value in parts.items():
        total = total + weights[name] * ops.cast(value, "float32")
    return total
