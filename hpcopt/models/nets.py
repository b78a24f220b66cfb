"""Built-in networks in plain torch (no torchvision), each `(input_shape, classes, ...) -> nn.Module`.

- `lenet`: LeNet-5 (LeCun et al. 1998) for 1x28x28 (any C x H x W >= 12 x 12 works):
  conv 5x5 (6, padding 2) - norm - ReLU - max-pool 2 - conv 5x5 (16) - norm - ReLU -
  max-pool 2 - FC 120 - ReLU - FC 84 - ReLU - FC classes. ReLU and max pooling replace the
  original's sigmoids and sub-sampling, as in the decentralized-learning papers.
- `vgg11`: VGG-11 (Simonyan & Zisserman 2015, configuration A) for 3x32x32 CIFAR-10:
  eight 3x3 conv - norm - ReLU layers (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M)
  and one linear classifier (512 -> classes), the CIFAR variant without the 4096-wide
  layers and without dropout (dropout would make every step depend on one more stream).
- `resnet20`: the CIFAR ResNet of He et al. 2016 (section 4.2): 3x3 conv 16, three stages
  of three basic blocks (16, 32, 64 channels, stride 2 between stages), global average
  pooling, linear classifier. Shortcuts that change shape are 1x1 conv + norm (option B).
- `cnn`: a small conv net for small images (fits the bundled 8x8 digits as 1x8x8):
  conv 3x3 (16) - norm - ReLU - max-pool 2 - conv 3x3 (32) - norm - ReLU - max-pool 2 -
  FC 64 - ReLU - FC classes.
- `torch_mlp`: the NumPy `mlp` in torch: layers x @ W + b with W stored (in, out) and the
  same parameter order (W0, b0, W1, b1, ...), so a row means the same in both backends.

Normalisation (`model.norm`): GroupNorm by default with 2 groups per layer (1 where the
channel count is odd), the choice of Hsieh et al. 2020 for non-IID decentralized
training; `batch` gives BatchNorm with running statistics (per node in hpcopt).
PyTorch's default initialisations are kept (drawn from `model.init_seed` / `run.seed`).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(2 if channels % 2 == 0 else 1, channels)


def _flat_size(features: nn.Module, input_shape: Tuple[int, ...]) -> int:
    with torch.no_grad():
        was = features.training
        features.eval()
        out = features(torch.zeros(1, *input_shape))
        features.train(was)
    return int(out[0].numel())


def _check_image(name: str, input_shape: Tuple[int, ...], smallest: int) -> None:
    from ..config import ConfigError
    if len(input_shape) != 3 or min(input_shape[1:]) < smallest:
        raise ConfigError(f"model.name = {name!r} is not allowed: it needs images of at least {smallest}x{smallest} "
                          f"(C x H x W), the data are {'x'.join(map(str, input_shape))}")


class LeNet(nn.Module):
    def __init__(self, input_shape: Tuple[int, int, int], classes: int, norm: str = "group"):
        super().__init__()
        _check_image("lenet", input_shape, 12)
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), norm_layer(norm, 6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), norm_layer(norm, 16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(_flat_size(self.features, input_shape), 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class VGG11(nn.Module):
    LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, input_shape: Tuple[int, int, int], classes: int, norm: str = "group"):
        super().__init__()
        _check_image("vgg11", input_shape, 32)
        layers, c = [], input_shape[0]
        for v in self.LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), norm_layer(norm, v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(_flat_size(self.features, input_shape), classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = norm_layer(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm_layer(norm, cout))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, input_shape: Tuple[int, int, int], classes: int, norm: str = "group", blocks: int = 3):
        super().__init__()
        _check_image("resnet20", input_shape, 8)
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False), norm_layer(norm, 16),
                                  nn.ReLU())
        stages, c = [], 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(blocks):
                stages.append(BasicBlock(c, width, 2 if (i and not j) else 1, norm))
                c = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class SmallCNN(nn.Module):
    def __init__(self, input_shape: Tuple[int, int, int], classes: int, norm: str = "group"):
        super().__init__()
        _check_image("cnn", input_shape, 4)
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 16, 3, padding=1), norm_layer(norm, 16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), norm_layer(norm, 32), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(_flat_size(self.features, input_shape), 64), nn.ReLU(),
                                        nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class TorchMLP(nn.Module):
    """x @ W_i + b_i with tanh or ReLU between layers; W_i stored (in, out) like the NumPy mlp."""

    def __init__(self, input_shape: Tuple[int, ...], classes: int, hidden: Sequence[int] = (64,),
                 activation: str = "tanh"):
        super().__init__()
        sizes = [int(torch.tensor(input_shape).prod()), *hidden, classes]
        self.layers = len(sizes) - 1
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):  # registered W0, b0, W1, b1, ...: the row order
            self.register_parameter(f"w{i}", nn.Parameter(torch.zeros(a, b)))
            self.register_parameter(f"b{i}", nn.Parameter(torch.zeros(b)))
        self.activation = torch.tanh if activation == "tanh" else torch.relu

    def forward(self, x):
        h = x.reshape(x.shape[0], -1)
        for i in range(self.layers):
            h = h @ getattr(self, f"w{i}") + getattr(self, f"b{i}")
            if i < self.layers - 1:
                h = self.activation(h)
        return h


def build(name: str, input_shape: Tuple[int, ...], classes: int, cfg) -> nn.Module:
    """The built-in network `name` for data of `input_shape` (C, H, W or (features,))."""
    if name == "torch_mlp":
        return TorchMLP(input_shape, classes, cfg.hidden, cfg.activation.value)
    net = {"lenet": LeNet, "vgg11": VGG11, "resnet20": ResNet20, "cnn": SmallCNN}[name]
    return net(input_shape, classes, cfg.norm.value)
