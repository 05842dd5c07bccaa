"""ResNet-50 (He et al. 2016, "Deep Residual Learning"), the torchvision v1.5 layout
(stride on the 3×3 convolution), as an example of `--model python:module:factory`:

    simulate --hw gpu_a100.yaml --model python:workloads.resnet:resnet50 --phase forward

torchvision itself is not a dependency: the only torchvision 0.28.0 wheel (the build that
pairs with torch 2.13.0) reachable here links CUDA libraries and does not import beside the
CPU torch. This module has torchvision's parameter count, 25,557,032 (a test checks it).
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand ×4, with a projected shortcut
    where the shape changes."""

    expansion = 4

    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(inputs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(inputs, out, 1, stride, bias=False),
                                         nn.BatchNorm2d(out))
                           if stride != 1 or inputs != out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inputs, stages = 64, []
        for stage, count in enumerate(blocks):
            width = 64 << stage
            layers = []
            for index in range(count):
                layers.append(Bottleneck(inputs, width, 2 if index == 0 and stage else 1))
                inputs = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(batch: int = 1, resolution: int = 224,
             dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """ResNet-50 and a batch of `batch` RGB images at `resolution`² (on the current device:
    meta under `simulate`)."""
    model = ResNet().to(dtype)
    return model, (torch.zeros(batch, 3, resolution, resolution, dtype=dtype),)
