"""SRGAN networks: SRResNet generator and the paper's VGG-style discriminator.

Ledig et al., "Photo-Realistic Single Image Super-Resolution Using a Generative Adversarial
Network", CVPR 2017. Only keras.ops and built-in/registered layers are used (no Lambda, no
closures), so a ``.keras`` file loads with ``keras.models.load_model(path, safe_mode=True)``.

Value ranges: the generator takes LR in [0, 1] and returns SR that is *approximately* in [0, 1].
The output is deliberately not clipped in the graph: a clip would zero the gradient of every
pixel that overshoots, which stalls training early on. Clip (and round) at inference/metrics time.
The discriminator takes HR/SR patches in [0, 1] and returns one raw logit per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
from keras import layers, ops

from srgan.config import DiscriminatorConfig, GeneratorConfig

# Sub-pixel upsampling stages per scale: x4 is two x2 stages as in the paper.
UPSAMPLE_STEPS: dict[int, tuple[int, ...]] = {2: (2,), 3: (3,), 4: (2, 2)}


@keras.saving.register_keras_serializable(package="srgan")
class PixelShuffle(layers.Layer):
    """Sub-pixel rearrangement (N, H, W, C*r*r) -> (N, H*r, W*r, C) (TF depth_to_space order)."""

    def __init__(self, block_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(block_size) < 2:
            raise ValueError(f"PixelShuffle: block_size must be >= 2, got {block_size}")
        self.block_size = int(block_size)

    def call(self, inputs):
        return ops.depth_to_space(inputs, self.block_size, data_format="channels_last")

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        r = self.block_size
        if c is not None and c % (r * r):
            raise ValueError(f"PixelShuffle: channels ({c}) must be divisible by block_size^2 ({r * r})")
        return (
            b,
            None if h is None else h * r,
            None if w is None else w * r,
            None if c is None else c // (r * r),
        )

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "block_size": self.block_size}


@keras.saving.register_keras_serializable(package="srgan")
class BicubicUpsample(layers.Layer):
    """Bicubic upscale by an integer factor (Keys kernel a=-0.5, half-pixel centres).

    For upscaling this is the same kernel as PIL's bicubic used to make the LR data
    (antialiasing only matters when downscaling); edge handling may differ by a hair.
    """

    def __init__(self, scale: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(scale) < 1:
            raise ValueError(f"BicubicUpsample: scale must be >= 1, got {scale}")
        self.scale = int(scale)

    def call(self, inputs):
        shape = ops.shape(inputs)  # dynamic: the generator accepts any LR size
        size = (shape[1] * self.scale, shape[2] * self.scale)
        out = ops.image.resize(inputs, size, interpolation="bicubic", antialias=False)
        return ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        s = self.scale
        return (b, None if h is None else h * s, None if w is None else w * s, c)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale}


def _conv(filters: int, kernel: int, name: str, *, strides: int = 1, use_bias: bool = True, **kw: Any):
    return layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=use_bias, name=name, **kw
    )


def _prelu(name: str) -> layers.PReLU:
    # One slope per channel, shared over space, as in the paper (and so any input size works).
    # alpha starts at 0.25 as in He et al. (2015), the PReLU paper (Keras' default 0 starts as ReLU).
    return layers.PReLU(shared_axes=[1, 2], alpha_initializer=keras.initializers.Constant(0.25), name=name)


def build_generator(cfg: GeneratorConfig, scale: int) -> keras.Model:
    """SRResNet generator for ``scale`` in {2, 3, 4}; input (B, h, w, 3) LR in [0, 1], any h, w."""
    if scale not in UPSAMPLE_STEPS:
        raise ValueError(f"build_generator: scale must be one of {sorted(UPSAMPLE_STEPS)}, got {scale}")
    f, bn = cfg.filters, cfg.batch_norm
    lr = keras.Input(shape=(None, None, 3), name="lr")

    x = _conv(f, 9, "input_conv")(lr)
    x = head = _prelu("input_prelu")(x)

    for i in range(cfg.blocks):
        p = f"res{i}_"
        # Conv bias is redundant right before BN (BN's beta absorbs it).
        y = _conv(f, 3, p + "conv1", use_bias=not bn)(x)
        if bn:
            y = layers.BatchNormalization(name=p + "bn1")(y)
        y = _prelu(p + "prelu")(y)
        y = _conv(f, 3, p + "conv2", use_bias=not bn)(y)
        if bn:
            y = layers.BatchNormalization(name=p + "bn2")(y)
        x = layers.Add(name=p + "add")([x, y])

    x = _conv(f, 3, "trunk_conv", use_bias=not bn)(x)
    if bn:
        x = layers.BatchNormalization(name="trunk_bn")(x)
    x = layers.Add(name="trunk_add")([head, x])  # long skip over all residual blocks

    # float32 head: under a mixed_bfloat16 policy the image output and the skip-sum stay
    # full precision (what Keras recommends for a model's last layer).
    # With the bicubic skip the last conv starts at zero, so the untrained generator *is* bicubic:
    # a random residual on top of it costs the first few hundred steps just to be unlearnt (the
    # residual branch collapses and stalls: measured here as a plateau at the bicubic loss).
    init = "zeros" if cfg.bicubic_skip else "glorot_uniform"
    if cfg.upsampler == "light":
        # ESPCN-style (Shi et al., CVPR 2016): one conv predicts all scale^2 sub-pixels of the RGB
        # output at LR resolution, so no conv runs at HR resolution (~2.6x fewer FLOPs for 8x32).
        x = _conv(3 * scale * scale, 3, "output_conv", dtype="float32", kernel_initializer=init)(x)
        out = PixelShuffle(scale, name="output_shuffle", dtype="float32")(x)
    else:
        for i, r in enumerate(UPSAMPLE_STEPS[scale]):
            x = _conv(f * r * r, 3, f"up{i}_conv")(x)
            x = PixelShuffle(r, name=f"up{i}_shuffle")(x)
            x = _prelu(f"up{i}_prelu")(x)
        out = _conv(3, 9, "output_conv", dtype="float32", kernel_initializer=init)(x)
    if cfg.bicubic_skip:
        # Residual learning on top of bicubic: the net only has to add the missing detail.
        base = BicubicUpsample(scale, name="bicubic", dtype="float32")(lr)
        out = layers.Add(name="bicubic_add", dtype="float32")([base, out])
    return keras.Model(lr, out, name="generator")


def build_discriminator(cfg: DiscriminatorConfig, hr_patch: int) -> keras.Model:
    """Paper discriminator: 8 conv3x3 (f..8f, strides 1,2,...), LeakyReLU(0.2), dense, 1 logit.

    Input (B, hr_patch, hr_patch, 3) in [0, 1]; it is rescaled to [-1, 1] inside (paper's HR range).
    Output (B, 1) raw logits (no sigmoid: the losses work on logits). For wasserstein_gp prefer
    ``batch_norm: false``: BN couples the samples of a batch, which the per-sample gradient
    penalty assumes they are not (Gulrajani et al. 2017).
    """
    f, bn = cfg.filters, cfg.batch_norm
    hr = keras.Input(shape=(hr_patch, hr_patch, 3), name="hr")
    x = layers.Rescaling(2.0, offset=-1.0, name="to_pm1")(hr)
    widths = (f, f, 2 * f, 2 * f, 4 * f, 4 * f, 8 * f, 8 * f)
    for i, w in enumerate(widths):
        use_bn = bn and i > 0  # no BN after the first conv, as in the paper
        x = _conv(w, 3, f"conv{i}", strides=1 if i % 2 == 0 else 2, use_bias=not use_bn)(x)
        if use_bn:
            x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.LeakyReLU(negative_slope=0.2, name=f"lrelu{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(cfg.dense, name="dense")(x)
    x = layers.LeakyReLU(negative_slope=0.2, name="dense_lrelu")(x)
    logits = layers.Dense(1, name="logits", dtype="float32")(x)
    return keras.Model(hr, logits, name="discriminator")


def load_generator(path: str | Path) -> keras.Model:
    """Load a ``.keras`` generator with safe_mode=True (only registered layers, no code)."""
    return keras.models.load_model(str(path), safe_mode=True, compile=False)


ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: a fixed one for every member


def save_generator(model: keras.Model, path: str | Path) -> Path:
    """Save a generator as a ``.keras`` file atomically and byte-stably.

    Keras stamps the save time into the archive (``metadata.json``'s ``date_saved`` and the weights
    member's zip timestamp), so equal weights would give different bytes and DVC would re-run
    everything downstream. The archive is rewritten without them; Keras loads it as before.
    """
    import json
    import zipfile

    from srgan.dataio import atomic_path

    with atomic_path(path) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp) as src:
            members = [(info, src.read(info)) for info in src.infolist()]
        with zipfile.ZipFile(tmp, "w") as dst:
            for info, data in members:
                if info.filename == "metadata.json":
                    meta = json.loads(data)
                    meta.pop("date_saved", None)
                    data = json.dumps(meta, sort_keys=True).encode()
                stable = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
                stable.compress_type, stable.external_attr = info.compress_type, info.external_attr
                dst.writestr(stable, data)
    return Path(path)


def _concrete_shapes(model: keras.Model, input_shape: tuple[int, ...]) -> dict[int, tuple]:
    """Propagate a concrete input shape through a single-input functional model.

    Returns ``id(KerasTensor) -> shape``. Uses each layer's own compute_output_shape, so the
    count follows the layer configs (kernel, strides, padding) rather than a timed run.
    """
    if len(model.inputs) != 1:
        raise ValueError("generator_flops: only single-input models are supported")
    shapes: dict[int, tuple] = {id(model.inputs[0]): tuple(input_shape)}
    for layer in model.layers:
        if isinstance(layer, layers.InputLayer):
            continue
        ins = layer.input
        in_shapes = [shapes[id(t)] for t in ins] if isinstance(ins, (list, tuple)) else shapes[id(ins)]
        out_shape = layer.compute_output_shape(in_shapes)
        shapes[id(layer.output)] = tuple(out_shape)
    return shapes


def generator_flops(model: keras.Model, lr_shape: Sequence[int]) -> int:
    """Analytic FLOPs of one forward pass: 2 x multiply-adds of every Conv2D and Dense layer.

    ``lr_shape`` is (h, w), (h, w, c) or (batch, h, w, c); the count is for the whole batch
    (batch 1 unless given). Biases, BN, activations, the pixel shuffle and the bicubic skip are
    not counted (they are O(pixels), negligible next to the convolutions). Works for any
    single-input functional model whose layers are each called once (e.g. the discriminator);
    a shared (re-called) layer would be counted once.
    """
    dims = tuple(int(d) for d in lr_shape)
    if len(dims) == 2:
        dims = (1, *dims, 3)
    elif len(dims) == 3:
        dims = (1, *dims)
    elif len(dims) != 4:
        raise ValueError(
            f"generator_flops: lr_shape must be (h, w), (h, w, c) or (b, h, w, c), got {lr_shape}"
        )
    shapes = _concrete_shapes(model, dims)
    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):  # also matches subclasses of Conv2D
            b, oh, ow, cout = shapes[id(layer.output)]
            cin = shapes[id(layer.input)][-1]
            kh, kw = layer.kernel_size
            total += 2 * b * oh * ow * kh * kw * (cin // layer.groups) * cout
        elif isinstance(layer, layers.Dense):
            in_shape = shapes[id(layer.input)]
            positions = 1
            for d in in_shape[:-1]:
                positions *= d
            total += 2 * positions * in_shape[-1] * layer.units
    return int(total)
