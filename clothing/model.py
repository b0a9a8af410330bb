"""The backbone (ImageNet MobileNetV2, frozen) and the trainable head on top of it.

The model is split where the sweep needs it: `features` (conv trunk, frozen, always in eval mode),
`pool` (global average pool + flatten, no weights) and `head` (the only trainable part). Training
the head on cached pooled features is then exactly training the full model on images.

Partial fine-tuning moves the cut: with `finetune_blocks=k` the last k inverted-residual blocks and
the closing 1x1 convolution (`features[cut:]`, cut = 18 - k) train too, BatchNorm included, while
`features[:cut]` stays frozen in eval mode. `tail()` is the trainable part as one module, so training
it on cached activations at the cut is exactly training the full model on images.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from clothing.data import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, build_transforms

FEATURE_DIM = 1280  # MobileNetV2's pooled feature size
# MobileNetV2's `features`: [0] stem conv, [1..17] inverted-residual blocks, [18] the 1x1 conv to 1280.
LAST_CONV = 18
MAX_FINETUNE_BLOCKS = 17
TORCHVISION_WEIGHTS = "IMAGENET1K_V1"


class BackboneError(ValueError):
    """The backbone weights could not be loaded; the message says what to pass instead."""


def load_backbone(weights: str | Path | None = TORCHVISION_WEIGHTS) -> models.MobileNetV2:
    """An ImageNet MobileNetV2 in eval mode.

    `weights` is torchvision's enum name ("IMAGENET1K_V1", downloaded once into the torch cache),
    a path to a local torchvision state_dict (the offline route), or None for random weights (tests).
    """
    if weights is None:
        model = models.mobilenet_v2(weights=None)
    elif str(weights) == TORCHVISION_WEIGHTS:
        try:
            model = models.mobilenet_v2(weights=models.MobileNet_V2_Weights.IMAGENET1K_V1)
        except (OSError, RuntimeError) as exc:  # no network (URLError is an OSError), a bad download
            raise BackboneError(
                f"cannot download torchvision's {TORCHVISION_WEIGHTS} MobileNetV2 weights ({_first_line(exc)}); "
                "the default downloads them once into the torch cache ($TORCH_HOME). Offline, set "
                "CLOTHING_BACKBONE_WEIGHTS (or --backbone-weights) to a local MobileNetV2 state_dict"
            ) from exc
    else:
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(
                f"backbone weights file {path} does not exist; pass a MobileNetV2 state_dict "
                f"(CLOTHING_BACKBONE_WEIGHTS) or {TORCHVISION_WEIGHTS} to download torchvision's"
            )
        model = models.mobilenet_v2(weights=None)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # unpickling errors, wrong keys or shapes: all mean "wrong file"
            raise BackboneError(
                f"{path} is not a torchvision MobileNetV2 state_dict ({type(exc).__name__}); "
                "pass the right weights file"
            ) from exc
    return model.eval()


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def weights_fingerprint(module: nn.Module) -> str:
    """A short sha256 of a module's parameters and buffers: identifies the backbone in cache keys."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_head(num_classes: int, size_inner: int, dropout: float = 0.0) -> nn.Sequential:
    """[Linear(1280, size_inner) -> ReLU -> Dropout] -> Linear(-> num_classes); size_inner=0: linear."""
    if size_inner == 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURE_DIM, num_classes))
    return nn.Sequential(
        nn.Linear(FEATURE_DIM, size_inner),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(size_inner, num_classes),
    )


@dataclass(frozen=True)
class ModelSpec:
    """Everything that shapes the model and its input, and nothing else: checkpoints carry it as a
    plain dict, and `build_model` is the one way back from it to a module."""

    classes: tuple[str, ...]
    size_inner: int
    dropout: float = 0.0
    finetune_blocks: int = 0  # the last K inverted-residual blocks were trained too (stage 2)
    image_size: int = IMAGE_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return asdict(self)

    def transform(self) -> Callable:
        """The evaluation preprocessing the model expects, from the one transform factory."""
        return build_transforms(self.image_size, mean=self.mean, std=self.std)

    @classmethod
    def from_dict(cls, values: dict) -> ModelSpec:
        """The spec a checkpoint carries; tuples come back as tuples whatever container they were saved in."""
        names = set(cls.__dataclass_fields__)
        if not isinstance(values, dict) or set(values) - names or "classes" not in values:
            raise ValueError(f"not a model spec: expected keys among {sorted(names)}")
        converted = {k: tuple(v) if k in ("classes", "mean", "std") else v for k, v in values.items()}
        return cls(**converted)


def build_model(spec: ModelSpec, backbone: models.MobileNetV2 | None = None) -> ClothingClassifierMobileNet:
    """The classifier `spec` describes, on `backbone` (default: an untrained MobileNetV2, whose weights
    a checkpoint's state dict then replaces; nothing is downloaded)."""
    return ClothingClassifierMobileNet(
        spec.num_classes,
        spec.size_inner,
        spec.dropout,
        backbone if backbone is not None else load_backbone(None),
        finetune_blocks=spec.finetune_blocks,
    )


class GlobalPool(nn.Module):
    """Trunk activations (N, C, H, W) -> pooled features (N, C): global average pooling."""

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(activations, 1), 1)


def finetune_cut(blocks: int) -> int:
    """Index in `features` where the trainable tail starts when the last `blocks` blocks train."""
    if not 0 <= blocks <= MAX_FINETUNE_BLOCKS:
        raise ValueError(f"finetune blocks must be in 0..{MAX_FINETUNE_BLOCKS}, got {blocks}")
    return LAST_CONV - blocks if blocks else LAST_CONV + 1  # 0: nothing of the trunk trains


class ClothingClassifierMobileNet(nn.Module):
    """MobileNetV2 trunk (frozen up to the cut) + global average pool + a small trainable head."""

    def __init__(
        self,
        num_classes: int = 10,
        size_inner: int = 100,
        dropout: float = 0.0,
        backbone: models.MobileNetV2 | None = None,
        finetune_blocks: int = 0,
    ) -> None:
        super().__init__()
        backbone = backbone if backbone is not None else load_backbone(None)
        self.features = backbone.features
        self.cut = finetune_cut(finetune_blocks)
        for index, layer in enumerate(self.features):
            for param in layer.parameters():
                param.requires_grad = index >= self.cut
        self.pool = GlobalPool()
        self.head = build_head(num_classes, size_inner, dropout)
        self.train(False)

    def train(self, mode: bool = True) -> ClothingClassifierMobileNet:
        # A frozen trunk must keep using its BatchNorm running statistics: in train mode they would
        # drift towards each batch and the features would no longer match the cached ones.
        super().train(mode)
        self.features.train(mode and self.cut <= LAST_CONV)  # the trunk trains only from the cut on
        self.features[: self.cut].eval()
        return self

    def tail(self) -> nn.Sequential:
        """The trainable part from the cut on (shares its modules with this model): activations at
        the cut -> logits, with named parts: `blocks` (the trunk's trained blocks, empty without
        fine-tuning), `pool` and `head`. Its state dict is what a trial's checkpoint holds."""
        return nn.Sequential(OrderedDict(blocks=self.features[self.cut :], pool=self.pool, head=self.head))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(images)))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should get: only those that require gradients."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, for "N trainable parameters out of M"."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in trainable_parameters(model)), total


def head_only(head: nn.Module) -> nn.Sequential:
    """A head named as it is inside `ClothingClassifierMobileNet.tail()`, so that what stage 1 trains
    has the same state-dict keys as the tail of a model without fine-tuning."""
    return nn.Sequential(OrderedDict(head=head))
