"""Deterministic, non-degenerate random weights for the zoo's models.

PyTorch's default initialisation with a batch norm's default statistics (mean 0, variance 1)
shrinks activations layer after layer: a random-weight MobileNetV2 gives the same logits, to 8
digits, whatever the input, and any backend would "match" it. So every norm gets a random affine
transform, and every batch norm the statistics of random data flowing through the network
(calibrated in training mode on one batch of random inputs), so each one hands the next layer
activations of unit scale, as a trained network's do. A linear or convolution layer initialised
to zero gets random weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import InputSpec, random_inputs

CALIBRATION_BATCH = 2


def calibrated(module: nn.Module, inputs: Sequence[InputSpec], seed: int, int_high: int = 8) -> nn.Module:
    """``module`` with random norm affines and batch-norm statistics calibrated on random
    ``inputs`` (shapes of one example; the batch dimension is widened), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        for m in module.modules():
            # A layer initialised to zero (ViT's classifier head, so that training starts from
            # uniform predictions) makes every output the same whatever the input.
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.weight[0].numel() ** 0.5)
        if norms:
            batch = [((CALIBRATION_BATCH, *shape[1:]), dtype) for shape, dtype in inputs]
            momenta = [m.momentum for m in norms]
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # the running statistics become this batch's
            module.train()
            module(*random_inputs(batch, seed=seed, int_high=int_high))
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
    return module.eval()
