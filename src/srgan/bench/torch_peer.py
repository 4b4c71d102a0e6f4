"""Optional PyTorch peer: the benchmarked networks and sizes in plain PyTorch eager, channels_last.

Mirrors ``models.build_generator`` (SRResNet, light or paper upsampler, optional BN and bicubic
skip), ``models.build_discriminator`` (its [0, 1] -> [-1, 1] rescale left out), VGG19 cut at
``vgg.layer`` (frozen) and Adam; times the G MSE step, a D step on G's fakes and the SRGAN step
(one G forward, D on real and fake, per-pix loss with VGG and the non-saturating adversarial loss,
both optimizers), in float32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``.
Without torch the job returns ``{"skipped": <one line>}``.
"""

from __future__ import annotations

from typing import Any

from .timing import rate, time_calls

try:
    import torch
    from torch import nn
    from torch.nn import functional as F

    _Module: type = nn.Module
except ImportError as exc:  # torch is optional, not a project requirement
    torch, _MISSING, _Module = None, exc, object

UPSAMPLE_STEPS = {2: (2,), 3: (3,), 4: (2, 2)}  # as models.UPSAMPLE_STEPS (no TF import here)
VGG19_WIDTHS = ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)
PRELU_INIT = 0.25  # as models.build_generator's PReLUs


def net_spec(cfg: Any) -> dict[str, Any]:
    """The networks, sizes and loss weights of a project Config, as plain JSON for the child."""
    g, d, t, loss = cfg.model.generator, cfg.model.discriminator, cfg.train, cfg.loss
    return {**g.model_dump(), "d": d.model_dump(), "scale": cfg.preprocess.scale, "batch": t.batch_size,
            "patch": t.hr_patch, "beta1": t.adam_beta1, "lr": cfg.gan.lr, "seed": cfg.seed,
            "vgg_layer": cfg.vgg.layer if loss.w_vgg > 0 else None, "feature_scale": cfg.vgg.feature_scale,
            "w_mse": loss.w_mse, "w_vgg": loss.w_vgg, "w_adv": loss.w_adv}


def _conv(cin: int, cout: int, k: int, bias: bool = True, stride: int = 1) -> Any:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)


class Residual(_Module):
    """``x + body(x)``."""

    def __init__(self, *body: Any):
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x: Any) -> Any:
        return x + self.body(x)


class Generator(_Module):
    """SRResNet as ``models.build_generator`` builds it."""

    def __init__(self, n: dict[str, Any]):
        super().__init__()
        f, bn, s = n["filters"], n["batch_norm"], n["scale"]
        norm = [nn.BatchNorm2d] if bn else []
        self.head = nn.Sequential(_conv(3, f, 9), nn.PReLU(f, PRELU_INIT))
        body = [Residual(_conv(f, f, 3, not bn), *(m(f) for m in norm), nn.PReLU(f, PRELU_INIT),
                         _conv(f, f, 3, not bn), *(m(f) for m in norm)) for _ in range(n["blocks"])]
        self.trunk = nn.Sequential(*body, _conv(f, f, 3, not bn), *(m(f) for m in norm))
        up = [_conv(f, 3 * s * s, 3), nn.PixelShuffle(s)] if n["upsampler"] == "light" else [
            m for r in UPSAMPLE_STEPS[s]
            for m in (_conv(f, f * r * r, 3), nn.PixelShuffle(r), nn.PReLU(f, PRELU_INIT))] + [_conv(f, 3, 9)]
        self.up, self.scale, self.bicubic = nn.Sequential(*up), s, n["bicubic_skip"]

    def forward(self, x: Any) -> Any:
        h = self.head(x)
        y = self.up(h + self.trunk(h))
        return y + F.interpolate(x, scale_factor=self.scale, mode="bicubic") if self.bicubic else y


def discriminator(d: dict[str, Any], patch: int) -> Any:
    """The paper discriminator as ``models.build_discriminator`` builds it."""
    f, mods, cin = d["filters"], [], 3
    for i, w in enumerate((f, f, 2 * f, 2 * f, 4 * f, 4 * f, 8 * f, 8 * f)):
        bn = d["batch_norm"] and i > 0  # no BN after the first conv
        mods += [_conv(cin, w, 3, not bn, stride=1 + i % 2), *([nn.BatchNorm2d(w)] if bn else []),
                 nn.LeakyReLU(0.2)]
        cin = w
    flat = cin * (patch // 16) ** 2  # after four stride-2 convs
    return nn.Sequential(*mods, nn.Flatten(), nn.Linear(flat, d["dense"]), nn.LeakyReLU(0.2),
                         nn.Linear(d["dense"], 1))


def vgg19(layer: str) -> Any:
    """VGG19's convolutional part up to Keras' layer name ``layer`` (e.g. block2_conv2), frozen."""
    named, cin = [], 3
    for b, widths in enumerate(VGG19_WIDTHS, 1):
        for c, w in enumerate(widths, 1):
            named += [(f"block{b}_conv{c}", _conv(cin, w, 3)), ("relu", nn.ReLU())]
            cin = w
        named.append((f"block{b}_pool", nn.MaxPool2d(2)))
    cut = [name for name, _ in named].index(layer) + (2 if "conv" in layer else 1)  # a conv keeps its ReLU
    return nn.Sequential(*[m for _, m in named[:cut]]).requires_grad_(False)


def build_steps(n: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The three steps as closures over one set of networks, optimizers and a batch in memory."""
    torch.manual_seed(n["seed"])
    cl, p, s, B = torch.channels_last, n["patch"], n["scale"], n["batch"]
    G, D = Generator(n).to(memory_format=cl), discriminator(n["d"], p).to(memory_format=cl)
    V = vgg19(n["vgg_layer"]).to(memory_format=cl) if n["vgg_layer"] else None
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=n["lr"], betas=(n["beta1"], 0.999)) for m in (G, D))
    hr = torch.rand(B, 3, p, p).contiguous(memory_format=cl)
    lr, ones, zeros = F.avg_pool2d(hr, s).contiguous(memory_format=cl), torch.ones(B, 1), torch.zeros(B, 1)
    bce = F.binary_cross_entropy_with_logits

    def amp() -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def update(loss: Any, opt: Any, **backward: Any) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward(**backward)

    def g_pretrain() -> dict[str, float]:
        with amp():
            loss = F.mse_loss(G(lr).float(), hr)
        update(loss, opt_g)
        opt_g.step()
        return {"g_mse": loss.item()}

    def d_step() -> dict[str, float]:
        with amp():
            with torch.no_grad():
                sr = G(lr)
            loss = bce(D(hr).float(), ones) + bce(D(sr).float(), zeros)
        update(loss, opt_d)
        opt_d.step()
        return {"d_loss": loss.item()}

    def srgan() -> dict[str, float]:
        with amp():
            sr = G(lr)
            fake = D(sr).float()
            d_loss = bce(D(hr).float(), ones) + bce(fake, zeros)
            g_loss = n["w_mse"] * F.mse_loss(sr.float(), hr) + n["w_adv"] * bce(fake, ones)
            if V is not None:
                fs = n["feature_scale"]
                g_loss = g_loss + n["w_vgg"] * F.mse_loss(V(sr).float() / fs, V(hr).float() / fs)
        # each loss back to its own network only, as the trainer's two tapes do
        update(d_loss, opt_d, inputs=list(D.parameters()), retain_graph=True)
        update(g_loss, opt_g, inputs=list(G.parameters()))
        opt_d.step()
        opt_g.step()
        return {"g_total": g_loss.item(), "d_loss": d_loss.item()}

    return {"g_pretrain": g_pretrain, "d_step": d_step, "srgan": srgan}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Child job: each step in each precision, timed by ``timing.time_calls(**spec['timing'])``."""
    if torch is None:
        return {"skipped": f"PyTorch peer skipped: torch is not importable ({_MISSING})"}
    if spec["net"].get("arch", "srresnet") != "srresnet":
        return {"skipped": f"PyTorch peer skipped: it mirrors arch srresnet only, not {spec['net']['arch']}"}
    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "precisions": {}}
    for dtype in spec.get("precisions", ("float32", "bfloat16")):
        steps = build_steps(spec["net"], dtype)
        out["precisions"][dtype] = {name: {**(r := time_calls(steps[name], **spec["timing"])),
                                           "per_s": rate(r["seconds"])} for name in spec["steps"]}
    return out
