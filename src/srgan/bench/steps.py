"""Training steps: the trainer's own public steps on a batch in memory, against the matmul limit.

FLOP convention. Forward FLOPs are 2 x the multiply-adds of every Conv2D/Dense layer
(``models.generator_flops``). A trained network counts 3x its forward FLOPs (forward, input
gradients, weight gradients); a frozen network that only passes gradients back 2x (forward, input
gradients); a forward pass alone 1x; a forward pass that G's and D's updates share counts once. BN,
activations, the optimizer and the bicubic skip are not counted. With F_X(n) the forward FLOPs of
network X on n images and B the batch:

    G pretrain = 3 F_G(B)
    D step     = F_G(B) + 3 F_D(2B)                      (fakes from G's forward pass, D on real + fake)
    SRGAN step = 3 F_G(B) + 3 F_D(2B) + F_D(B)           (D also passes G's gradient for the fakes)
                 + F_V(2B) + F_V(B)                      (VGG on HR and SR, gradient through SR only)

A step's FLOP/s are reported as a fraction of the matmul limit of the dtype it computes in
(``limits.POLICY_DTYPE``: a mixed_bfloat16 step against the bfloat16 matmul), from its own process.
"""

from __future__ import annotations

from typing import Any

from .. import config
from .limits import POLICY_DTYPE, matmul_limits
from .timing import CpuMeter, rate, time_calls

STEPS = ("g_pretrain", "d_step", "srgan")
LABELS = {"g_pretrain": "G pretrain (MSE)", "d_step": "D step", "srgan": "SRGAN step"}


class BenchSteps:
    """The trainer's own public steps of both phases (what training runs), built for timing."""

    def __init__(self, cfg: config.Config):
        import keras

        from ..trainer import Trainer, prepare_runtime

        runtime = prepare_runtime(cfg)
        self.precision = keras.config.dtype_policy().name  # what the config's precision chose here
        pre, gan = Trainer(cfg, "pretrain", runtime), Trainer(cfg, "gan", runtime)
        self.G, self.D, self.uses_vgg = gan.G, gan.D, gan.vgg is not None
        self.steps = {"g_pretrain": pre.pretrain_step, "d_step": gan.d_step, "srgan": gan.gan_step}


def vgg_flops(layer: str, shape: tuple[int, ...]) -> int:
    """Forward FLOPs of ``losses.build_vgg_extractor`` (Keras' VGG19 cut at ``layer``).

    Counted on Keras' own VGG19 graph: the extractor re-calls those layers on a new input, which
    ``generator_flops`` (one call per layer) cannot follow.
    """
    import keras

    from .. import models

    vgg = keras.applications.VGG19(include_top=False, weights=None, input_shape=(None, None, 3))
    return models.generator_flops(keras.Model(vgg.input, vgg.get_layer(layer).output), shape)


def step_flops(G: Any, D: Any, vgg_layer: str | None, batch: int, patch: int, scale: int) -> dict[str, float]:
    """FLOPs per call of each step under the module's convention (``vgg_layer`` None: no VGG loss)."""
    from .. import models

    lr = patch // scale
    f_g = models.generator_flops(G, (batch, lr, lr, 3))
    f_d = models.generator_flops(D, (batch, patch, patch, 3))
    f_v = vgg_flops(vgg_layer, (batch, patch, patch, 3)) if vgg_layer else 0
    return {"forward_G": f_g, "forward_D": f_d, "forward_VGG": f_v, "g_pretrain": 3 * f_g,
            "d_step": f_g + 6 * f_d, "srgan": 3 * f_g + 7 * f_d + 3 * f_v}


def limit_fraction(variant: dict[str, Any], step: str) -> float:
    """A timed step's FLOP/s over the same-process matmul limit of the dtype its precision computes in."""
    dtype = POLICY_DTYPE[variant["precision"]]
    return variant["steps"][step]["flop_per_s"] / variant["limits"][dtype]["flop_per_s"]


def memory_batch(cfg: config.Config) -> tuple[Any, Any]:
    """A seeded (lr, hr) batch held in memory: HR noise and its box-filtered LR."""
    import tensorflow as tf

    t, s = cfg.train, cfg.preprocess.scale
    hr = tf.random.stateless_uniform((t.batch_size, t.hr_patch, t.hr_patch, 3), (cfg.seed, 7))
    return tf.nn.avg_pool2d(hr, s, s, "VALID"), hr


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Child job: the matmul limits, then each requested step of one variant, timed."""
    cfg = config.from_dict(spec["cfg"])
    out: dict[str, Any] = {"limits": matmul_limits(spec["matmul_n"])}
    bench = BenchSteps(cfg)
    out["precision"] = bench.precision
    t = cfg.train
    flops = step_flops(bench.G, bench.D, cfg.vgg.layer if bench.uses_vgg else None, t.batch_size, t.hr_patch,
                       cfg.preprocess.scale)
    batch, out["steps"] = memory_batch(cfg), {}
    for name in spec["steps"]:
        with CpuMeter() as meter:
            r = time_calls(lambda fn=bench.steps[name]: fn(batch), **spec["timing"])
        r.update(flops=flops[name], per_s=rate(r["seconds"]), flop_per_s=flops[name] / r["seconds"]["median"],
                 cpu=meter.result)
        out["steps"][name] = r
    return {**out, "flops": flops}
