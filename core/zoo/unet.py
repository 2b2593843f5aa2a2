"""Interactive segmentation in the style of SqueezeSAM (Meta, 2023): a UNet whose input stacks
the photo's RGB with a positive and a negative click map, with self-attention at the bottleneck,
returning mask logits at full resolution (imports torch)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import BUILTIN
from ._weights import calibrated
from .transformer import EncoderLayer


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SqueezeSAM(nn.Module):
    """Encoder: a stem and three stride-2 stages (16-32-64-128 channels); bottleneck: two
    transformer layers over the 16x16 feature map; decoder: bilinear 2x upsampling, the encoder's
    skip connection concatenated, a conv block per stage; head: 1x1 conv to one mask channel."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.stem = _block(3 + 2, widths[0])
        self.down = nn.ModuleList(_block(a, b, 2) for a, b in zip(widths, widths[1:]))
        self.bottleneck = nn.Sequential(*(EncoderLayer(widths[-1], heads, 2 * widths[-1]) for _ in range(layers)))
        self.up = nn.ModuleList(_block(b + a, a) for a, b in zip(widths[-2::-1], widths[:0:-1]))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, image: torch.Tensor, clicks: torch.Tensor) -> torch.Tensor:
        x = self.stem(torch.cat([image, clicks], dim=1))
        skips = []
        for stage in self.down:
            skips.append(x)
            x = stage(x)
        b, c, h, w = x.shape
        x = self.bottleneck(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        for stage, skip in zip(self.up, reversed(skips)):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], dim=1))
        return self.head(x)


def squeezesam() -> nn.Module:
    """128x128 photo + 2 click maps -> 1x1x128x128 mask logits. Parameters: 753,249; FLOPs: 1,546,649,600."""
    torch.manual_seed(0)
    return calibrated(SqueezeSAM(), BUILTIN["squeezesam"].inputs, 8)
