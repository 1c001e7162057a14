"""Small-image encoders, registered in timm's model registry.

Checkpoints name "a timm architecture + kwargs" (prune/embed/checkpoints.py); registering these here
keeps that true for architectures timm does not ship. ImageNet ResNets open with a 7x7
stride-2 convolution and a max-pool, which leaves a 28-32 px image at 8x8 before the first
block; `small_resnet` opens with a 3x3 stride-1 convolution instead (as ResNets for CIFAR do).
"""

from __future__ import annotations

from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

SMALL_RESNET = "small_resnet"


@register_model
def small_resnet(pretrained: bool = False, layers=(1, 1, 1, 1), stem_pool: bool = True, **kwargs) -> ResNet:
    """timm's ResNet (BasicBlock) with a 3x3 stride-1 stem; `stem_pool` keeps the stem's max-pool."""
    if pretrained:
        raise ValueError(f"{SMALL_RESNET} has no pretrained weights; load a checkpoint instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # create_model's, not the model's
        kwargs.pop(key, None)
    model = ResNet(BasicBlock, layers=tuple(layers), **kwargs)
    stem = model.conv1
    model.conv1 = nn.Conv2d(stem.in_channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if not stem_pool:
        model.maxpool = nn.Identity()
    return model
