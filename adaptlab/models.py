"""Backbones selectable by name from configs: `mlp`, `lenet`, `resnet18`.

Every factory takes the stream's `input_shape` (C, H, W) and `n_classes`; defaults are visible
in the signatures. `build_model` checks with one dummy forward that the input fits, so a shape
mismatch is one clear error at start-up rather than a stack trace mid-run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = fn
        return fn

    return deco


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@register("mlp")
def mlp(
    input_shape: Sequence[int], n_classes: int, hidden: Sequence[int] = (256,),
    activation: str = "relu",
) -> nn.Module:
    """Flatten, then Linear-ReLU blocks (e.g. 64-256-10 on digits)."""
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[activation]
    layers: list[nn.Module] = [nn.Flatten()]
    width = _numel(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), act()]
        width = int(h)
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


@register("lenet")
def lenet(
    input_shape: Sequence[int], n_classes: int, channels: Sequence[int] = (6, 16)
) -> nn.Module:
    """LeNet-5 style: two 5x5 conv (padding 2) + max-pool blocks, then 120-84 dense.

    Padding keeps it valid on 8x8 digits as on 28x28 MNIST and 32x32 CIFAR.
    """
    c, h, w = (int(s) for s in input_shape)
    c1, c2 = (int(k) for k in channels)
    feats = nn.Sequential(
        nn.Conv2d(c, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = c2 * (h // 4) * (w // 4)
    if flat == 0:
        raise ValueError(f"input shape {tuple(input_shape)} is too small for lenet (needs >= 4x4)")
    return nn.Sequential(
        feats, nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, n_classes),
    )


@register("resnet18")
def resnet18(input_shape: Sequence[int], n_classes: int, width: int = 64) -> nn.Module:
    """torchvision's ResNet-18 adapted to small inputs: 3x3 stride-1 stem, no max-pool."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(num_classes=n_classes, width_per_group=width)
    net.conv1 = nn.Conv2d(int(input_shape[0]), 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def build_model(name: str, input_shape: Sequence[int], n_classes: int, **kwargs) -> nn.Module:
    """Build a registered backbone and check that `input_shape` fits it."""
    if name not in MODELS:
        raise ValueError(f"backbone: unknown {name!r}; choose one of {sorted(MODELS)}")
    if n_classes < 2:
        raise ValueError(f"n_classes: a classifier needs at least 2 classes, got {n_classes}")
    try:
        model = MODELS[name](tuple(input_shape), int(n_classes), **kwargs)
    except TypeError as err:
        raise ValueError(f"backbone_args: {err} (backbone {name!r})") from None
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(torch.zeros(2, *input_shape))
            model.train(was)
    except RuntimeError as err:
        raise ValueError(
            f"input shape {tuple(input_shape)} does not fit backbone {name!r}: "
            f"{str(err).splitlines()[0]}"
        ) from None
    if tuple(out.shape) != (2, n_classes):
        raise ValueError(f"backbone {name!r} outputs {tuple(out.shape[1:])}, not ({n_classes},)")
    return model
