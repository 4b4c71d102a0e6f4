"""SRGAN networks: SRResNet, EDSR and RRDB (ESRGAN) generators, the paper's VGG-style discriminator.

Ledig et al., "Photo-Realistic Single Image Super-Resolution Using a Generative Adversarial
Network", CVPR 2017; Lim et al., "Enhanced Deep Residual Networks for Single Image
Super-Resolution" (EDSR), CVPRW 2017; Wang et al., "ESRGAN: Enhanced Super-Resolution Generative
Adversarial Networks", ECCVW 2018. Only keras.ops and built-in/registered layers are used (no
Lambda, no closures), so a ``.keras`` file loads with ``keras.models.load_model(path, safe_mode=True)``.

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
import numpy as np
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


# Bicubic as tf.image.resize(..., "bicubic", antialias=False) computes it (TF's "Keys cubic" path).
KEYS_A = -0.5  # Keys (1981) cubic-convolution parameter: TF's and PIL's bicubic
# TF looks the kernel up in a table of the sub-pixel offset sampled at 1/1024 steps
# (resize_bicubic_op.cc, kTableSize): at x3 the offsets 1/3 and 2/3 are rounded to it. Matching
# the table keeps old .keras generators' outputs unchanged (exact Keys differs by <= 3e-4 at x3).
TF_BICUBIC_TABLE = 1024
BICUBIC_TAPS = 4  # the Keys kernel's support: 4 input px per output px along each axis
# Per phase the 4 taps start at offset -2 or -1 (sub-pixel offset below / above the LR centre),
# so one centred 5-tap window (offsets -2..2) holds every phase's taps.
BICUBIC_WINDOW = BICUBIC_TAPS + 1
BICUBIC_RADIUS = BICUBIC_WINDOW // 2  # LR px of context the bicubic skip reads on each side


def _keys(x: float) -> float:
    """The Keys cubic kernel at distance ``x`` (a = KEYS_A)."""
    x, a = abs(x), KEYS_A
    if x <= 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return 0.0


def bicubic_phase_taps(scale: int) -> np.ndarray:
    """(BICUBIC_WINDOW, scale) float64: the 1-D bicubic filter of each output phase.

    Output px ``o = scale * i + j`` (phase j) samples input coordinate ``i + (j + 0.5) / scale - 0.5``
    (half-pixel centres); column j holds its 4 Keys weights at window offsets -2..2 around ``i``.
    The weights sum to 1; at the image border the caller renormalises over the taps inside it.
    """
    taps = np.zeros((BICUBIC_WINDOW, scale))
    centre = BICUBIC_WINDOW // 2
    for j in range(scale):
        coord = (j + 0.5) / scale - 0.5  # relative to input px i, in (-0.5, 0.5)
        base = int(np.floor(coord))  # -1 or 0: the input px left of the sample point
        delta = np.rint((coord - base) * TF_BICUBIC_TABLE) / TF_BICUBIC_TABLE
        for k in range(-1, BICUBIC_TAPS - 1):  # the 4 taps base-1 .. base+2
            taps[centre + base + k, j] = _keys(delta - k)
    return taps


def bilinear_phase_taps(scale: int) -> np.ndarray:
    """(BICUBIC_WINDOW, scale) float64: the 1-D bilinear filter of each output phase, as
    ``tf.image.resize(x, "bilinear")`` upsamples (half-pixel centres): 2 taps per phase. At the
    border, renormalising over the in-image tap gives it weight 1, which is TF's coordinate clamp."""
    taps = np.zeros((BICUBIC_WINDOW, scale))
    centre = BICUBIC_WINDOW // 2
    for j in range(scale):
        coord = (j + 0.5) / scale - 0.5
        base = int(np.floor(coord))
        delta = coord - base
        taps[centre + base, j] += 1.0 - delta
        taps[centre + base + 1, j] += delta
    return taps


PHASE_TAPS = {"bicubic": bicubic_phase_taps, "bilinear": bilinear_phase_taps}  # FixedUpsample kernels


@keras.saving.register_keras_serializable(package="srgan")
class FixedUpsample(layers.Layer):
    """Upscale by an integer factor as ``tf.image.resize(x, kernel, antialias=False)`` does
    (half-pixel centres; ``kernel`` bicubic: Keys a = -0.5, or bilinear), as a fixed separable
    convolution.

    Each output phase is a fixed filter (4 taps bicubic, 2 bilinear) per axis: the columns pass computes the ``scale``
    phases as weighted sums of shifted (zero-padded) slices and interleaves them (stack +
    reshape, i.e. depth-to-space along one axis), then the rows pass does the same. Like TF
    (and PIL), taps that fall outside the image get no weight and the rest are renormalised: the
    sums are divided by the same filter applied to an all-ones line. Only slices, multiply-adds,
    stack and reshape: it has an XLA kernel (ResizeBicubic has none) and maps onto ONNX/TFLite
    ops. (A depthwise conv + depth_to_space computes the same but ran 3-20x slower here.)

    It has no weights (the taps are constants from ``scale``), so .keras files saved with the
    earlier resize-based layer load unchanged. It is position-invariant, so unlike the resize
    (float32 coordinates, size-dependent at x3) tiles reproduce the whole image's output.
    """

    def __init__(self, scale: int, kernel: str = "bicubic", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(scale) < 1:
            raise ValueError(f"{type(self).__name__}: scale must be >= 1, got {scale}")
        if kernel not in PHASE_TAPS:
            raise ValueError(f"{type(self).__name__}: kernel must be one of {sorted(PHASE_TAPS)}, got {kernel!r}")
        self.scale, self.kernel = int(scale), kernel
        taps = PHASE_TAPS[kernel](self.scale)
        # per phase: (window offset, weight) of its nonzero taps, as Python floats (graph constants)
        self._phases = [
            [(k, float(taps[k, j])) for k in range(BICUBIC_WINDOW) if taps[k, j] != 0.0]
            for j in range(self.scale)
        ]

    def _filter(self, x, axis: int):
        """Unnormalised phase sums of ``x`` along ``axis`` (1 rows, 2 columns), interleaved."""
        pad = [[0, 0]] * 4
        pad[axis] = [BICUBIC_RADIUS, BICUBIC_RADIUS]
        xp = ops.pad(x, pad)  # zero padding: out-of-image taps contribute nothing

        def shifted(k: int):
            index = [slice(None)] * 4
            stop = k - 2 * BICUBIC_RADIUS
            index[axis] = slice(k, stop if stop else None)
            return xp[tuple(index)]

        views = {k: shifted(k) for k in sorted({k for taps in self._phases for k, _ in taps})}
        phases = []
        for taps in self._phases:
            (k0, w0), *rest = taps
            acc = w0 * views[k0]
            for k, w in rest:
                acc = acc + w * views[k]
            phases.append(acc)
        y = ops.stack(phases, axis=axis + 1)  # (..., n, scale, ...): phase next to its input px
        shape = ops.shape(y)
        return ops.reshape(y, (*shape[:axis], shape[axis] * self.scale, *shape[axis + 2 :]))

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.scale == 1:
            return x
        # columns first: the second pass, on the scale-times larger tensor, then slices whole
        # rows (contiguous), measured 15-30% faster than rows first without XLA
        for axis in (2, 1):
            ones = ops.ones_like(x[:1, :, :1, :1] if axis == 1 else x[:1, :1, :, :1])
            # in-image weight per output line: 1 inside, < 1 within BICUBIC_RADIUS px of the border
            x = self._filter(x, axis) / self._filter(ones, axis)
        return x

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        s = self.scale
        return (b, None if h is None else h * s, None if w is None else w * s, c)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale, "kernel": self.kernel}


@keras.saving.register_keras_serializable(package="srgan")
class BicubicUpsample(FixedUpsample):
    """The bicubic skip: :class:`FixedUpsample` with the bicubic kernel, under the class name that
    saved generators refer to."""

    def __init__(self, scale: int, **kwargs: Any) -> None:
        kwargs.pop("kernel", None)  # always bicubic; older configs have no key
        super().__init__(scale, "bicubic", **kwargs)


def _conv(filters: int, kernel: int, name: str, *, strides: int = 1, use_bias: bool = True, **kw: Any):
    return layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=use_bias, name=name, **kw
    )


def _prelu(name: str) -> layers.PReLU:
    # One slope per channel, shared over space, as in the paper (and so any input size works).
    # alpha starts at 0.25 as in He et al. (2015), the PReLU paper (Keras' default 0 starts as ReLU).
    return layers.PReLU(shared_axes=[1, 2], alpha_initializer=keras.initializers.Constant(0.25), name=name)


# Receptive-field radii (px at the layer's own resolution) of the convs the generators use.
RADIUS_3X3 = 1
RADIUS_9X9 = 4
LEAKY_SLOPE = 0.2  # ESRGAN's LeakyReLU slope (also the discriminator's)
RDBS_PER_RRDB = 3  # residual dense blocks in one RRDB (ESRGAN)
# ESRGAN initialises the dense-block convs with He-normal scaled by 0.1 (so std 0.1 x He's):
# the blocks start close to identity and a deep RRDB stack trains stably.
ESRGAN_INIT_SCALE = 0.1


def _scaled(x, res_scale: float, name: str):
    """``res_scale * x`` (a built-in Rescaling layer, saved with the model); nothing when 1."""
    return x if res_scale == 1.0 else layers.Rescaling(res_scale, name=name)(x)


def _srresnet_trunk(x, cfg: GeneratorConfig):
    """Ledig et al. 2017: 9x9 conv + PReLU, residual blocks conv-(BN)-PReLU-conv-(BN), long skip."""
    f, bn = cfg.filters, cfg.batch_norm
    x = _conv(f, 9, "input_conv")(x)
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
    return layers.Add(name="trunk_add")([head, x])  # long skip over all residual blocks


def _edsr_trunk(x, cfg: GeneratorConfig):
    """Lim et al. 2017: 3x3 conv, residual blocks conv-ReLU-conv (no BN) scaled by res_scale, long skip.

    EDSR's RGB mean subtraction is left out: the bicubic skip (or the output conv's bias) absorbs it.
    """
    f, rs = cfg.filters, cfg.edsr.res_scale
    x = head = _conv(f, 3, "input_conv")(x)
    for i in range(cfg.blocks):
        p = f"res{i}_"
        y = _conv(f, 3, p + "conv1", activation="relu")(x)
        y = _conv(f, 3, p + "conv2")(y)
        x = layers.Add(name=p + "add")([x, _scaled(y, rs, p + "scale")])
    x = _conv(f, 3, "trunk_conv")(x)
    return layers.Add(name="trunk_add")([head, x])


def _rdb(x, cfg: GeneratorConfig, p: str):
    """Residual dense block: dense_layers convs, each fed every earlier output (LeakyReLU 0.2);
    the last fuses back to ``filters`` channels and is added scaled by res_scale."""
    r = cfg.rrdb
    init = keras.initializers.VarianceScaling(
        scale=2.0 * ESRGAN_INIT_SCALE**2, mode="fan_in", distribution="untruncated_normal"
    )
    feats = [x]
    for k in range(r.dense_layers - 1):
        inp = feats[0] if k == 0 else layers.Concatenate(name=f"{p}cat{k}")(feats)
        y = _conv(r.growth, 3, f"{p}conv{k}", kernel_initializer=init)(inp)
        feats.append(layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=f"{p}lrelu{k}")(y))
    last = r.dense_layers - 1
    inp = feats[0] if last == 0 else layers.Concatenate(name=f"{p}cat{last}")(feats)
    y = _conv(cfg.filters, 3, f"{p}conv{last}", kernel_initializer=init)(inp)
    return layers.Add(name=p + "add")([x, _scaled(y, r.res_scale, p + "scale")])


def _rrdb_trunk(x, cfg: GeneratorConfig):
    """Wang et al. 2018 (ESRGAN): 3x3 conv, RRDBs (3 residual dense blocks, the whole RRDB again
    a residual scaled by res_scale), 3x3 trunk conv, long skip. No BN."""
    f, rs = cfg.filters, cfg.rrdb.res_scale
    x = head = _conv(f, 3, "input_conv")(x)
    for i in range(cfg.blocks):
        y = x
        for j in range(RDBS_PER_RRDB):
            y = _rdb(y, cfg, f"rrdb{i}_rdb{j}_")
        x = layers.Add(name=f"rrdb{i}_add")([x, _scaled(y, rs, f"rrdb{i}_scale")])
    x = _conv(f, 3, "trunk_conv")(x)
    return layers.Add(name="trunk_add")([head, x])


TRUNKS = {"srresnet": _srresnet_trunk, "edsr": _edsr_trunk, "rrdb": _rrdb_trunk}


def _paper_upsampler(x, cfg: GeneratorConfig, scale: int, init: str):
    """Each architecture's own HR head (``upsampler: paper``) up to the 3-channel float32 output."""
    f = cfg.filters
    out = {"dtype": "float32", "kernel_initializer": init}
    if cfg.arch == "rrdb":
        # ESRGAN: nearest-neighbour x2 + 3x3 conv + LeakyReLU per stage, then an HR conv and the
        # output conv (x3, which ESRGAN does not train, is one nearest x3 stage).
        for i, r in enumerate(UPSAMPLE_STEPS[scale]):
            x = layers.UpSampling2D(r, interpolation="nearest", name=f"up{i}_nearest")(x)
            x = _conv(f, 3, f"up{i}_conv")(x)
            x = layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=f"up{i}_lrelu")(x)
        x = _conv(f, 3, "hr_conv")(x)
        x = layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name="hr_lrelu")(x)
        return _conv(3, 3, "output_conv", **out)(x)
    for i, r in enumerate(UPSAMPLE_STEPS[scale]):
        # sub-pixel stages: SRResNet with PReLU, EDSR without an activation
        x = _conv(f * r * r, 3, f"up{i}_conv")(x)
        x = PixelShuffle(r, name=f"up{i}_shuffle")(x)
        if cfg.arch == "srresnet":
            x = _prelu(f"up{i}_prelu")(x)
    # SRResNet's 9x9 output conv; EDSR's 3x3
    return _conv(3, 9 if cfg.arch == "srresnet" else 3, "output_conv", **out)(x)


def build_generator(cfg: GeneratorConfig, scale: int) -> keras.Model:
    """The ``cfg.arch`` generator (srresnet | edsr | rrdb) for ``scale`` in {2, 3, 4}.

    Input (B, h, w, 3) LR in [0, 1], any h, w; output (B, h*scale, w*scale, 3) float32.
    """
    if scale not in UPSAMPLE_STEPS:
        raise ValueError(f"build_generator: scale must be one of {sorted(UPSAMPLE_STEPS)}, got {scale}")
    lr = keras.Input(shape=(None, None, 3), name="lr")
    x = TRUNKS[cfg.arch](lr, cfg)

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
    elif cfg.upsampler == "resize":
        # resize-convolution (Odena et al. 2016): bilinear upsampling of the features, then one 3x3
        # conv at HR to RGB, as many FLOPs as `light`. Every sub-pixel phase shares one kernel, so a
        # flat region gives a flat output: no scale-periodic checkerboard, which the pixel shuffle's
        # scale^2 independent kernels develop under the adversarial loss (metrics.subpixel_artifact).
        # Bilinear, not nearest: nearest makes the inner sub-pixels of each LR pixel see the same
        # single feature (measured: SRResNet -0.25 dB PSNR-Y vs `light`; bilinear -0.07). A fixed
        # filter, not UpSampling2D (an image resize): exportable at any input size, and tiles
        # reproduce the whole image's output. The features are narrowed first (resize_filters):
        # their bilinear upscale and the HR conv dominate the cost (48 features: 0.58x light's
        # training steps/s; 12: 0.80x, docs/MEASUREMENTS.md).
        if 0 < cfg.resize_filters < cfg.filters:
            x = _conv(cfg.resize_filters, 3, "output_narrow")(x)
            x = _prelu("output_narrow_prelu")(x)
        x = FixedUpsample(scale, "bilinear", name="output_upsample")(x)
        out = _conv(3, 3, "output_conv", dtype="float32", kernel_initializer=init)(x)
    else:
        out = _paper_upsampler(x, cfg, scale, init)
    if cfg.bicubic_skip:
        # Residual learning on top of bicubic: the net only has to add the missing detail.
        base = BicubicUpsample(scale, name="bicubic", dtype="float32")(lr)
        out = layers.Add(name="bicubic_add", dtype="float32")([base, out])
    return keras.Model(lr, out, name="generator")


def _trunk_radius(cfg: GeneratorConfig) -> int:
    """LR px the trunk reads on each side (3x3 conv: 1); dense blocks: the longest conv chain."""
    if cfg.arch == "srresnet":
        return RADIUS_9X9 + cfg.blocks * 2 * RADIUS_3X3 + RADIUS_3X3
    if cfg.arch == "edsr":
        return RADIUS_3X3 + cfg.blocks * 2 * RADIUS_3X3 + RADIUS_3X3
    return RADIUS_3X3 + cfg.blocks * RDBS_PER_RRDB * cfg.rrdb.dense_layers * RADIUS_3X3 + RADIUS_3X3


def receptive_radius(cfg: GeneratorConfig, scale: int) -> int:
    """Receptive-field radius in LR px: the largest distance from an HR output pixel's own LR
    pixel to an LR pixel it depends on. Tiled inference equals whole-image inference when
    ``evaluate.tile_overlap >= receptive_radius`` (see srgan.inference).

    Convs after an upsampling reach ``r`` px at their resolution; going down a x``m`` stage an
    HR offset ``r`` spans at most ``ceil(r / m)`` px of the parent (worst sub-pixel position).
    The bound is exact (tests measure it). With B = blocks, L = rrdb.dense_layers:

    ========  ===========  ====================================
    arch      light        paper
    ========  ===========  ====================================
    srresnet  2B + 6       2B + 8
    edsr      2B + 3       2B + 4
    rrdb      3LB + 3      3LB + 4 (x2, x4), 3LB + 3 (x3)
    ========  ===========  ====================================

    and at least BICUBIC_RADIUS (2) with the bicubic skip. A dense block's radius is its longest
    conv chain (L), not its conv count: ESRGAN's 23 x 3 x 5 chain gives 349 px, so tiles of an
    ESRGAN-size model only match the whole image exactly with an overlap near whole-image size
    (smaller overlaps trade exactness for small seams; the far context weighs little).
    """
    if scale not in UPSAMPLE_STEPS:
        raise ValueError(f"receptive_radius: scale must be one of {sorted(UPSAMPLE_STEPS)}, got {scale}")
    steps = UPSAMPLE_STEPS[scale]
    lr_radius = _trunk_radius(cfg)
    # radius of the convs at each resolution above LR: hr[i] runs after upsampling stage i
    hr = [0] * len(steps)
    if cfg.upsampler in ("light", "resize"):
        # light: a 3x3 conv at LR; resize: a 3x3 conv at HR after a bilinear xscale, which reaches
        # 1 LR px as well (the HR neighbours' bilinear taps stay within the LR pixel's neighbours)
        lr_radius += RADIUS_3X3
        if cfg.upsampler == "resize" and 0 < cfg.resize_filters < cfg.filters:
            lr_radius += RADIUS_3X3  # the narrowing conv at LR
    elif cfg.arch == "rrdb":
        hr = [RADIUS_3X3] * len(steps)  # nearest stage, then its conv
        hr[-1] += 2 * RADIUS_3X3  # HR conv + output conv
    else:
        # sub-pixel stage i's conv runs before its shuffle, i.e. at the resolution of stage i-1
        lr_radius += RADIUS_3X3
        for i in range(1, len(steps)):
            hr[i - 1] += RADIUS_3X3
        hr[-1] += RADIUS_9X9 if cfg.arch == "srresnet" else RADIUS_3X3
    reach = 0
    for i in reversed(range(len(steps))):
        reach = -(-(reach + hr[i]) // steps[i])  # ceil division down one stage
    net = reach + lr_radius
    return max(net, BICUBIC_RADIUS) if cfg.bicubic_skip else net


def tile_overlap_warning(cfg: GeneratorConfig, scale: int, tile: int, overlap: int) -> str | None:
    """Why tiled inference with this ``tile``/``overlap`` can differ from whole-image inference
    (seams), or None when it equals it (``tile`` 0, or ``overlap >= receptive_radius``)."""
    radius = receptive_radius(cfg, scale)
    if tile == 0 or overlap >= radius:
        return None
    return (f"evaluate.tile_overlap {overlap} is below the generator's receptive-field radius {radius} LR px "
            f"({cfg.arch}, {cfg.blocks} blocks, x{scale}): tiled outputs may show seams and differ slightly from "
            f"whole-image inference; set evaluate.tile_overlap >= {radius} (or evaluate.tile: 0) for exact output")


def build_discriminator(cfg: DiscriminatorConfig, hr_patch: int) -> keras.Model:
    """Paper discriminator: ``convs`` conv3x3 (f..8f, strides 1,2,...; paper 8), LeakyReLU(0.2), then its head.

    Input (B, hr_patch, hr_patch, 3) in [0, 1]; it is rescaled to [-1, 1] inside (paper's HR range).
    ``head: dense`` (paper): flatten, dense ``dense``, one raw logit per image, (B, 1);
    ``head: patch``: a 1x1 conv to one logit per position of the last feature map, (B, h, w, 1)
    (the losses average over positions: every position is a judged sample). ``spectral_norm``
    wraps every kernel in spectral normalisation. For wasserstein_gp prefer ``batch_norm: false``:
    BN couples the samples of a batch, which the per-sample gradient penalty assumes they are not
    (Gulrajani et al. 2017).
    """
    f, bn = cfg.filters, cfg.batch_norm

    def layer(inner: layers.Layer) -> layers.Layer:
        return layers.SpectralNormalization(inner, name=f"{inner.name}_sn") if cfg.spectral_norm else inner

    hr = keras.Input(shape=(hr_patch, hr_patch, 3), name="hr")
    x = layers.Rescaling(2.0, offset=-1.0, name="to_pm1")(hr)
    widths = (f, f, 2 * f, 2 * f, 4 * f, 4 * f, 8 * f, 8 * f)[:cfg.convs]
    for i, w in enumerate(widths):
        use_bn = bn and i > 0  # no BN after the first conv, as in the paper
        x = layer(_conv(w, 3, f"conv{i}", strides=1 if i % 2 == 0 else 2, use_bias=not use_bn))(x)
        if use_bn:
            x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=f"lrelu{i}")(x)
    if cfg.head == "patch":
        logits = layer(_conv(1, 1, "logits", dtype="float32"))(x)
        return keras.Model(hr, logits, name="discriminator")
    x = layers.Flatten(name="flatten")(x)
    x = layer(layers.Dense(cfg.dense, name="dense"))(x)
    x = layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name="dense_lrelu")(x)
    logits = layer(layers.Dense(1, name="logits", dtype="float32"))(x)
    return keras.Model(hr, logits, name="discriminator")


def load_generator(path: str | Path) -> keras.Model:
    """Load a ``.keras`` generator with safe_mode=True (only registered layers, no code)."""
    return keras.models.load_model(str(path), safe_mode=True, compile=False)


ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: a fixed one for every member


def _stable_shared_ids(config_json: bytes) -> bytes:
    """Keras names objects shared by several layers by their Python ``id()``, a memory address
    that differs in every process: number them 1, 2, ... in order of appearance instead (loading
    only matches equal ids, so the model is the same)."""
    import json
    import re

    ids: dict[str, str] = {}

    def renumber(m: re.Match) -> str:
        return f'{m.group(1)}{ids.setdefault(m.group(2), str(len(ids) + 1))}'

    text = re.sub(r'("shared_object_id":\s*)(\d+)', renumber, config_json.decode())
    json.loads(text)  # still valid JSON
    return text.encode()


SAVED_POLICY = "float32"  # what a saved generator computes in, whatever precision trained it


def _float32_policies(config_json: bytes) -> bytes:
    """Every layer's dtype policy as :data:`SAVED_POLICY`. A mixed-precision policy is a training
    choice of one machine (``train.precision: auto``); its variables are float32 anyway, so the
    file loads the same weights, and a generator trained with bf16 on an AMX Xeon does not run
    emulated bf16 (4.5x slower) wherever it is evaluated, served or exported."""
    import json

    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            if o.get("class_name") == "DTypePolicy" and isinstance(o.get("config"), dict):
                o["config"]["name"] = SAVED_POLICY
            return {k: walk(v) for k, v in o.items()}
        return [walk(v) for v in o] if isinstance(o, list) else o

    return json.dumps(walk(json.loads(config_json))).encode()


def float32_copy(model: keras.Model) -> keras.Model:
    """The same model computing in float32, as its saved ``.keras`` file loads (see
    :func:`_float32_policies`): validation during mixed-precision training then scores what the
    evaluate stage will."""
    import json

    config = json.dumps(keras.saving.serialize_keras_object(model)).encode()
    clone = keras.saving.deserialize_keras_object(json.loads(_float32_policies(config)))
    clone.set_weights(model.get_weights())
    return clone


def save_generator(model: keras.Model, path: str | Path) -> Path:
    """Save a generator as a ``.keras`` file atomically and byte-stably.

    Keras stamps the save time into the archive (``metadata.json``'s ``date_saved`` and the weights
    member's zip timestamp), so equal weights would give different bytes and DVC would re-run
    everything downstream. The archive is rewritten without them; Keras loads it as before. The
    layers are saved with float32 policies (see :func:`_float32_policies`).
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
                elif info.filename == "config.json":
                    data = _stable_shared_ids(_float32_policies(data))
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
