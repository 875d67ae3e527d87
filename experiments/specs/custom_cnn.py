"""A small CNN of your own: the model of experiments/specs/custom_model.yaml (model.name custom_cnn:small_cnn).

nmtrain imports this file as the module ``custom_cnn`` (the spec's command puts this folder on
PYTHONPATH) and calls ``small_cnn`` by keyword with those of num_classes, in_channels, image_size and
width that its signature names. Nothing here depends on nmtrain: any function that returns a
torch.nn.Module giving num_classes logits per image will do.
"""

import torch.nn as nn


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


def small_cnn(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Three 3x3 conv blocks with max pooling, a depthwise-separable block, global average pooling and one
    Linear layer; any image size.

    Channels are 16-32-32-64 times ``width``, rounded to multiples of 8, so every layer after the first
    splits into whole N:M groups for M up to 8. The depthwise 3x3 convolution has no dense GEMM operand:
    nmtrain leaves it dense and says so in summary.json's ``skipped_layers``.
    """
    c1, c2, c3 = (max(8, round(c * width / 8) * 8) for c in (16, 32, 64))
    return nn.Sequential(
        *conv_bn_relu(in_channels, c1), nn.MaxPool2d(2),
        *conv_bn_relu(c1, c2), nn.MaxPool2d(2),
        *conv_bn_relu(c2, c2),
        nn.Conv2d(c2, c2, 3, padding=1, groups=c2, bias=False),        # depthwise
        *conv_bn_relu(c2, c3, kernel=1),                                 # pointwise
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, num_classes),
    )
