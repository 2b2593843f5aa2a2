"""Convolutional models: a small test CNN, MobileNetV2, ResNet-18, and an image-to-music
suggestion model on a MobileNetV3-Small embedding (imports torch)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import BUILTIN
from ._weights import calibrated


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU,
             ) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """conv-bn-relu blocks, a residual add, pooling and a classifier: 1x3x64x64 -> 1x10.

    ``channels``: those of the stem and residual block, and of the strided conv after the pool;
    ``classes``: the classifier's outputs (the fuzz seeds use ``SmallCNN((4, 4), 3)``)."""

    def __init__(self, channels: tuple[int, int] = (16, 32), classes: int = 10) -> None:
        super().__init__()
        c, d = channels
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.down = nn.Sequential(nn.Conv2d(c, d, 3, stride=2, padding=1), nn.BatchNorm2d(d), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = nn.functional.max_pool2d(x, 2)
        x = self.down(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection, residual."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0, 1000 classes), the architecture of Sandler et al. 2018."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        cin = 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with an identity (or 1x1 strided) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, 3, stride), _conv_bn(cout, cout, 3, act=None))
        self.shortcut = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016): 7x7 stem, max pool, four stages of two basic blocks, 1000 classes."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1)
        return self.fc(torch.flatten(x, 1))


class SqueezeExcite(nn.Module):
    """Channel attention of MobileNetV3: global pool, 1x1 reduce + ReLU, 1x1 expand + hard sigmoid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = max(8, (channels // 4 + 4) // 8 * 8)
        self.reduce, self.expand = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.expand(torch.relu(self.reduce(s))))


class Bneck(nn.Module):
    """MobileNetV3's block: optional 1x1 expansion, kxk depthwise, optional squeeze-excite, 1x1 projection."""

    def __init__(self, cin: int, k: int, hidden: int, cout: int, se: bool, act: type[nn.Module], stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(cin, hidden, 1, act=act)] if hidden != cin else []
        layers.append(_conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(_conv_bn(hidden, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV3Embedding(nn.Module):
    """MobileNetV3-Small (Howard et al. 2019) up to its 1024-wide head, projected to an
    ``dim``-dimensional, L2-normalised embedding."""

    # kernel, expansion, out, squeeze-excite, activation, stride
    SETTINGS = ((3, 16, 16, True, nn.ReLU, 2), (3, 72, 24, False, nn.ReLU, 2), (3, 88, 24, False, nn.ReLU, 1),
                (5, 96, 40, True, nn.Hardswish, 2), (5, 240, 40, True, nn.Hardswish, 1),
                (5, 240, 40, True, nn.Hardswish, 1), (5, 120, 48, True, nn.Hardswish, 1),
                (5, 144, 48, True, nn.Hardswish, 1), (5, 288, 96, True, nn.Hardswish, 2),
                (5, 576, 96, True, nn.Hardswish, 1), (5, 576, 96, True, nn.Hardswish, 1))

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 16, 3, 2, act=nn.Hardswish)]
        cin = 16
        for k, hidden, cout, se, act, stride in self.SETTINGS:
            layers.append(Bneck(cin, k, hidden, cout, se, act, stride))
            cin = cout
        layers.append(_conv_bn(cin, 576, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Linear(1024, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return F.normalize(self.head(x), dim=-1)


class ImageToMusic(nn.Module):
    """Suggest music for a photo: the photo's embedding, its cosine similarity with every track's
    embedding (a table shipped with the model), and the ``k`` most similar tracks."""

    def __init__(self, tracks: int = 2048, dim: int = 128, k: int = 10) -> None:
        super().__init__()
        self.embed = MobileNetV3Embedding(dim)
        self.register_buffer("tracks", F.normalize(torch.randn(tracks, dim), dim=-1))
        self.k = k

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        similarity = self.embed(image) @ self.tracks.T
        scores, ids = torch.topk(similarity, self.k, dim=-1)
        return scores, ids


def _build(name: str, model: nn.Module, seed: int) -> nn.Module:
    return calibrated(model, BUILTIN[name].inputs, seed)


def small_cnn() -> nn.Module:
    """A 3-block CNN for fast tests. Parameters: 10,218; FLOPs: 43,647,616."""
    torch.manual_seed(0)
    return _build("small_cnn", SmallCNN(), 1)


def mobilenet_v2() -> nn.Module:
    """MobileNetV2 1.0 at 224x224. Parameters: 3,504,872; FLOPs: 601,548,544."""
    torch.manual_seed(0)
    return _build("mobilenet_v2", MobileNetV2(), 3)


def resnet18() -> nn.Module:
    """ResNet-18 at 224x224. Parameters: 11,689,512; FLOPs: 3,628,146,688."""
    torch.manual_seed(0)
    return _build("resnet18", ResNet18(), 4)


def image_to_music() -> nn.Module:
    """MobileNetV3-Small embedding (128 dims) of a 224x224 photo against 2,048 track embeddings,
    top 10. Parameters: 1,649,056; FLOPs: 111,759,232."""
    torch.manual_seed(0)
    return _build("image_to_music", ImageToMusic(), 5)
