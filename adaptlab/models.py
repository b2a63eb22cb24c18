"""Backbones selectable by name from configs: `mlp`, `conv1d`, `lenet`, `lenet_bn`, `resnet18`,
`wideresnet`.

Every factory takes the stream's `input_shape` and `n_classes`: `mlp` takes any shape (it
flattens), `conv1d` sequences (C, L) or flat features (L,), `lenet` and `resnet18` images
(C, H, W). Defaults are visible in the signatures. `build_model` checks with one dummy forward,
in float32 as every stream serves its samples, that the input fits, so a shape mismatch is one
clear error at start-up rather than a stack trace mid-run.
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


@register("conv1d")
def conv1d(
    input_shape: Sequence[int], n_classes: int, channels: Sequence[int] = (32, 64),
    kernel: int = 5, hidden: int = 128,
) -> nn.Module:
    """For 1-D signals: conv (padding k//2) + ReLU + max-pool(2) per entry of `channels`,
    then a `hidden`-unit dense layer. Flat (L,) inputs are read as one channel."""
    if len(input_shape) not in (1, 2):
        raise ValueError(
            f"input shape {tuple(input_shape)} is not a sequence (C, L) or features (L,) for "
            "conv1d; use lenet or resnet18 for images"
        )
    c, length = (1, int(input_shape[0])) if len(input_shape) == 1 else map(int, input_shape)
    layers: list[nn.Module] = [nn.Unflatten(1, (1, length))] if len(input_shape) == 1 else []
    for width in (int(k) for k in channels):
        if length < 2:
            raise ValueError(
                f"input shape {tuple(input_shape)} is too short for conv1d with "
                f"{len(channels)} pooling blocks"
            )
        layers += [nn.Conv1d(c, width, kernel, padding=kernel // 2), nn.ReLU(), nn.MaxPool1d(2)]
        c, length = width, length // 2
    layers += [nn.Flatten(), nn.Linear(c * length, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)]
    return nn.Sequential(*layers)


def _image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"input shape {tuple(input_shape)} is not an image (C, H, W) for {name}; use "
            "conv1d for sequences (C, L) and mlp for flat features"
        )
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


@register("lenet")
def lenet(
    input_shape: Sequence[int], n_classes: int, channels: Sequence[int] = (6, 16)
) -> nn.Module:
    """LeNet-5 style: two 5x5 conv (padding 2) + max-pool blocks, then 120-84 dense.

    Padding keeps it valid on 8x8 digits as on 28x28 MNIST and 32x32 CIFAR.
    """
    c, h, w = _image_shape("lenet", input_shape)
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

    c, _, _ = _image_shape("resnet18", input_shape)
    net = tv_resnet18(num_classes=n_classes, width_per_group=width)
    net.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


@register("lenet_bn")
def lenet_bn(
    input_shape: Sequence[int], n_classes: int, channels: Sequence[int] = (16, 32),
    hidden: int = 128,
) -> nn.Module:
    """LeNet with BatchNorm after each conv (conv5x5-BN-ReLU-pool twice, then dense): the
    smallest backbone whose normalisation statistics test-time adaptation can re-estimate."""
    c, h, w = _image_shape("lenet_bn", input_shape)
    c1, c2 = (int(k) for k in channels)
    flat = c2 * (h // 4) * (w // 4)
    if flat == 0:
        raise ValueError(
            f"input shape {tuple(input_shape)} is too small for lenet_bn (needs >= 4x4)")
    return nn.Sequential(
        nn.Conv2d(c, c1, 5, padding=2, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, n_classes),
    )


class _WideBlock(nn.Module):
    """Pre-activation wide basic block, named as RobustBench's WideResNet so its state dicts
    (e.g. CIFAR-10 `Standard.pt`) load unchanged."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.equalInOut = c_in == c_out
        self.convShortcut = None if self.equalInOut else nn.Conv2d(
            c_in, c_out, 1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        y = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return y + (x if self.equalInOut else self.convShortcut(o))


class _WideGroup(nn.Module):
    def __init__(self, n: int, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*(
            _WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
            for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis 2016), RobustBench's layout and parameter names:
    the CIFAR-10-C benchmarks' source model (WRN-28-10, `Standard.pt`)."""

    def __init__(self, in_channels: int, n_classes: int, depth: int = 28, widen: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"wideresnet: depth must be 6n + 4 (10, 16, 28, …), got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _WideGroup(n, ch[0], ch[1], 1)
        self.block2 = _WideGroup(n, ch[1], ch[2], 2)
        self.block3 = _WideGroup(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


@register("wideresnet")
def wideresnet(
    input_shape: Sequence[int], n_classes: int, depth: int = 28, widen: int = 10
) -> nn.Module:
    """WRN-28-10 by default (`depth`, `widen` for smaller ones, e.g. WRN-10-1 in tests)."""
    c, _, _ = _image_shape("wideresnet", input_shape)
    return WideResNet(c, n_classes, depth=depth, widen=widen)


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def norm_layers(model: nn.Module, kinds: tuple[type, ...] = NORM_LAYERS) -> list[nn.Module]:
    """The normalisation layers of `model` (what test-time adaptation re-estimates or tunes)."""
    return [m for m in model.modules() if isinstance(m, kinds)]


def build_model(name: str, input_shape: Sequence[int], n_classes: int, **kwargs) -> nn.Module:
    """Build a registered backbone and check that `input_shape` fits it."""
    if name not in MODELS:
        raise ValueError(f"backbone: unknown {name!r}; choose one of {sorted(MODELS)}")
    if n_classes < 2:
        raise ValueError(f"n_classes: a classifier needs at least 2 classes, got {n_classes}")
    try:
        model = MODELS[name](tuple(input_shape), int(n_classes), **kwargs)
    except TypeError as err:
        raise ValueError(
            f"backbone_args: {err} (backbone {name!r}; arguments kept from a config written for "
            "another backbone are cleared with --model.init_args.backbone_args '{}')"
        ) from None
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


KV = tuple[torch.Tensor, torch.Tensor]


class _Block(nn.Module):
    """Pre-LayerNorm transformer block; attention returns its (K, V) for prefill/caching."""

    def __init__(self, d_model: int, n_head: int, d_mlp: int) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} must be divisible by n_head {n_head}")
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))

    def forward(self, h: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        t_all = k.shape[2]
        if past is None:
            att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i (absolute position t_all - t + i) sees keys 0 … its own position
            pos_q = torch.arange(t_all - t, t_all, device=h.device)[:, None]
            mask = torch.arange(t_all, device=h.device)[None, :] <= pos_q
            att = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        h = h + self.mlp(self.ln2(h))
        return h, (k, v)


class TinyGPT(nn.Module):
    """A small causal transformer for synthetic in-context tasks (docs/methods/forgetting.md).

    Learned token and position embeddings, pre-LayerNorm blocks, an output head tied to the
    token table by default, N(0, `initializer_range`²) init and no dropout. The token table,
    head and position table are reachable by name (`get_input_embeddings()` …) so forgetting
    regimes can reset them in place; `prefill` returns every layer's (K, V) for StreamAdapter.

    Args:
        vocab_size: rows of the token table (and outputs of the head).
        n_positions: longest sequence (plus cached prefix) the position table covers.
        n_layer, d_model, n_head, d_mlp: the body (defaults: 4 x 64, 4 heads, MLP 256).
        tie_head: the head's weight *is* the token table's weight.
        head_bias: a bias on the head (never reset by forgetting regimes).
        pad_id: padding row, kept at zero (`nn.Embedding(padding_idx=...)`).
        d_value: if > 0, a linear map of per-position real-valued inputs added to the token
            embedding (the `[x; y]` encoding of regression tasks, `stream_adapter.md` §4).
        reg_head: a scalar regression head `reg_head(h)` next to the tied token head.
        initializer_range: std of the normal init (GPT-2's 0.02).

    A position's input is `E[token] + E[label_token] + R·value + E_pos` (`label_tokens` and
    `values` optional): one position per in-context example (`stream_adapter.md` §1, §4).
    """

    def __init__(
        self,
        vocab_size: int,
        n_positions: int = 64,
        n_layer: int = 4,
        d_model: int = 64,
        n_head: int = 4,
        d_mlp: int = 256,
        tie_head: bool = True,
        head_bias: bool = False,
        pad_id: int | None = None,
        d_value: int = 0,
        reg_head: bool = False,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        if vocab_size < 2 or n_positions < 1 or n_layer < 1:
            raise ValueError(
                f"TinyGPT: vocab_size >= 2, n_positions >= 1 and n_layer >= 1 required, got "
                f"{vocab_size}, {n_positions}, {n_layer}"
            )
        self.vocab_size, self.n_positions, self.d_model = vocab_size, n_positions, d_model
        self.initializer_range = initializer_range
        self.tie_head = tie_head
        self.wte = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.wpe = nn.Embedding(n_positions, d_model)
        self.value_in = nn.Linear(d_value, d_model) if d_value > 0 else None
        self.blocks = nn.ModuleList(_Block(d_model, n_head, d_mlp) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=head_bias)
        self.reg_head = nn.Linear(d_model, 1) if reg_head else None
        self.apply(self._init)
        if tie_head:
            self.head.weight = self.wte.weight
        if pad_id is not None:
            with torch.no_grad():
                self.wte.weight[pad_id].zero_()

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def get_position_embeddings(self) -> nn.Embedding:
        return self.wpe

    def hidden(
        self, tokens: torch.Tensor, *, label_tokens: torch.Tensor | None = None,
        values: torch.Tensor | None = None, past_kv: list[KV] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Final-LayerNorm hidden states (B, T, d) and every layer's full (K, V)."""
        b, t = tokens.shape
        start = 0 if past_kv is None else past_kv[0][0].shape[2]
        if start + t > self.n_positions:
            raise ValueError(
                f"TinyGPT: {start + t} positions requested, n_positions is {self.n_positions}"
            )
        pos = torch.arange(start, start + t, device=tokens.device)
        h = self.wte(tokens) + self.wpe(pos)[None]
        if label_tokens is not None:
            h = h + self.wte(label_tokens)
        if values is not None:
            if self.value_in is None:
                raise ValueError("TinyGPT: values given but the model was built with d_value=0")
            h = h + self.value_in(values)
        kvs = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, None if past_kv is None else past_kv[i])
            kvs.append(kv)
        return self.ln_f(h), kvs

    def forward(
        self, tokens: torch.Tensor, *, label_tokens: torch.Tensor | None = None,
        values: torch.Tensor | None = None, past_kv: list[KV] | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KV]]:
        """Logits (B, T, V) at every position; with `return_kv`, also per-layer (K, V), each
        (B, n_head, T_past + T, d_head). Inputs after `tokens` are keyword-only (spec §1)."""
        h, kvs = self.hidden(tokens, label_tokens=label_tokens, values=values, past_kv=past_kv)
        logits = self.head(h)
        return (logits, kvs) if return_kv else logits

    @torch.no_grad()
    def prefill(
        self, tokens: torch.Tensor, *, label_tokens: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Run a prefix once: its logits and the per-layer (K, V) to pass as `past_kv`."""
        return self.forward(tokens, label_tokens=label_tokens, values=values, return_kv=True)

    def regress(self, h: torch.Tensor) -> torch.Tensor:
        """The scalar regression read-out (..., d) -> (...), for models built with reg_head."""
        if self.reg_head is None:
            raise ValueError("TinyGPT: regression read-out needs reg_head=True")
        return self.reg_head(h)[..., 0]
