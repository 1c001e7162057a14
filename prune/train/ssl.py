"""SimCLR pieces: batched augmentation, the projection head and the NT-Xent loss.

Pure torch, no Ray: the Ray Train loop in `pipelines/stages/train_encoder.py` wires them up, and the
tests drive them directly. Augmentation works on a whole uint8 batch at once (one affine grid
sample for crop + flip, vector ops for the photometric part), so it runs where the model runs
(GPU on a cluster) instead of as a per-image Python loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prune.train.settings import AugmentConfig


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def _chance(n: int, p: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


def augment(
    pixels: torch.Tensor,
    cfg: AugmentConfig,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    g: torch.Generator,
) -> torch.Tensor:
    """uint8 NHWC crops -> one random view each, float NCHW, normalized with mean/std.

    Random resized crop (area in cfg.crop_scale, aspect in cfg.crop_ratio) and horizontal flip as one
    affine resampling; then brightness/contrast/saturation jitter, grayscale, blur and erasing,
    each applied to a random subset of the batch.
    """
    dev = pixels.device
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    n = x.shape[0]
    area = _uniform(n, cfg.crop_scale[0], cfg.crop_scale[1], g, dev)
    log_ratio = _uniform(n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), g, dev)
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)  # crop side / image side
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = _uniform(n, -1.0, 1.0, g, dev) * (1 - w)  # crop centre, in [-1, 1] image coordinates
    cy = _uniform(n, -1.0, 1.0, g, dev) * (1 - h)
    flip = torch.where(_chance(n, 0.5 if cfg.hflip else 0.0, g, dev), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    jitter = _chance(n, cfg.jitter_prob, g, dev).view(n, 1, 1, 1)
    if cfg.brightness > 0:
        b = _uniform(n, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, g, dev).view(n, 1, 1, 1)
        x = torch.where(jitter, x * b, x)
    if cfg.contrast > 0:
        c = _uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, g, dev).view(n, 1, 1, 1)
        m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = torch.where(jitter, (x - m) * c + m, x)
    if cfg.saturation > 0:
        s = _uniform(n, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, g, dev).view(n, 1, 1, 1)
        gray = _gray(x)
        x = torch.where(jitter, (x - gray) * s + gray, x)
    if cfg.grayscale_prob > 0:
        x = torch.where(_chance(n, cfg.grayscale_prob, g, dev).view(n, 1, 1, 1), _gray(x).expand_as(x), x)
    if cfg.blur_prob > 0:
        x = torch.where(_chance(n, cfg.blur_prob, g, dev).view(n, 1, 1, 1), _blur(x, size, g), x)
    x = x.clamp_(0.0, 1.0)
    if cfg.erase_prob > 0:
        x = _erase(x, _chance(n, cfg.erase_prob, g, dev), g)
    m = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    s = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    return (x - m) / s


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blur(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur as in SimCLR: sigma in [0.1, 2.0] (one per batch), kernel about 10% of the side."""
    sigma = float(_uniform(1, 0.1, 2.0, g, x.device))
    radius = max(1, size // 20)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _erase(x: torch.Tensor, which: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random erasing: a rectangle of 2-33% of the area set to 0.5 gray, in the chosen samples."""
    n, _, hgt, wid = x.shape
    dev = x.device
    area = _uniform(n, 0.02, 0.33, g, dev)
    ratio = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), g, dev))
    eh = (torch.sqrt(area / ratio) * hgt).clamp(1, hgt)
    ew = (torch.sqrt(area * ratio) * wid).clamp(1, wid)
    y0 = torch.rand(n, generator=g, device=dev) * (hgt - eh)
    x0 = torch.rand(n, generator=g, device=dev) * (wid - ew)
    ys = torch.arange(hgt, device=dev).view(1, hgt, 1)
    xs = torch.arange(wid, device=dev).view(1, 1, wid)
    box = (ys >= y0.view(n, 1, 1)) & (ys < (y0 + eh).view(n, 1, 1)) & (xs >= x0.view(n, 1, 1)) & (xs < (x0 + ew).view(n, 1, 1))
    box = (box & which.view(n, 1, 1)).unsqueeze(1)
    return torch.where(box, torch.full_like(x, 0.5), x)


class ProjectionHead(nn.Module):
    """SimCLR's MLP head (Linear-BN-ReLU-Linear); discarded after training."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SimCLR(nn.Module):
    """Backbone + head; one forward for both views so BatchNorm sees the whole batch."""

    def __init__(self, backbone: nn.Module, hidden: int, out_dim: int):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(int(backbone.num_features), hidden, out_dim)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(views))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather=None) -> torch.Tensor:
    """SimCLR's NT-Xent: each view's positive is its twin, negatives every other view.

    `gather` (a differentiable all-gather across data-parallel workers) lets the negatives
    come from every worker's batch, so the loss is that of the global batch.
    """
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    offset = 0
    if gather is not None:
        all1, all2, rank = gather(z1), gather(z2), gather.rank
        offset = rank * z1.shape[0]
    else:
        all1, all2 = z1, z2
    n_all = all1.shape[0]
    keys = torch.cat([all1, all2])  # [2N_all, d]
    idx = torch.arange(z1.shape[0], device=z1.device) + offset
    loss = 0.0
    for q, self_idx, pos in ((z1, idx, idx + n_all), (z2, idx + n_all, idx)):
        logits = q @ keys.T / temperature
        logits = logits.scatter(1, self_idx.view(-1, 1), float("-inf"))  # a view is not its own negative
        loss = loss + F.cross_entropy(logits, pos)
    return loss / 2


class _AllGather(torch.autograd.Function):
    """all_gather whose backward hands each worker the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), t.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)  # every worker's loss depends on this worker's rows
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    return _AllGather.apply(t)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1 + math.cos(math.pi * progress))
