"""Backbones with a classifier and an L2-normalised embedding head.

Every model returns :class:`ModelOutput`: ``logits`` (B, C) and ``z`` (B, D), the embedding the
distractor search works on. torchvision supplies the backbones; for small inputs (MedMNIST's 28x28)
the stem is adapted rather than the image upsampled: the first convolution becomes 3x3 with stride
1 and the first max-pool is dropped, as in the MedMNIST "ResNet (28)" baselines, so a 28x28 image
still reaches the last stage at 4x4 instead of 1x1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from nil.config import MODELS
from nil.errors import NilError

LOG = logging.getLogger(__name__)

SMALL_INPUT = 64  # below this side length the stem is adapted for small images


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, C) float
    z: torch.Tensor  # (B, D) float, L2-normalised
    features: torch.Tensor  # (B, F) pooled backbone features, before the heads


class SmallCNN(nn.Module):
    """Four conv blocks for fast CPU runs; pooled features of width 256."""

    def __init__(self, in_channels: int):
        super().__init__()
        widths = [32, 64, 128, 256]
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.body = nn.Sequential(*layers)
        self.out_features = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)


def _conv_like(old: nn.Conv2d, in_channels: int, small: bool) -> nn.Conv2d:
    if small:
        return nn.Conv2d(in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    return nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)


def _torchvision_backbone(name: str, in_channels: int, small: bool) -> tuple[nn.Module, int]:
    """A torchvision backbone whose forward gives pooled features, and their width."""
    net = getattr(torchvision.models, name)(weights=None)
    if name.startswith("resnet"):
        net.conv1 = _conv_like(net.conv1, in_channels, small)
        if small:
            net.maxpool = nn.Identity()
        width = net.fc.in_features
        net.fc = nn.Identity()
    elif name == "densenet121":
        net.features.conv0 = _conv_like(net.features.conv0, in_channels, small)
        if small:
            net.features.pool0 = nn.Identity()
        width = net.classifier.in_features
        net.classifier = nn.Identity()
    elif name == "efficientnet_b0":
        stem = net.features[0][0]
        net.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1 if small else 2, padding=1, bias=False)
        width = net.classifier[-1].in_features
        net.classifier = nn.Identity()
    else:  # pragma: no cover - guarded by MODELS
        raise NilError(f"unknown model {name!r}")
    return net, width


class NilNet(nn.Module):
    """Backbone -> pooled features -> (linear classifier, projection head -> L2-normalised z)."""

    def __init__(self, backbone: nn.Module, width: int, num_classes: int, embed_dim: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(width, num_classes)
        # BatchNorm centres the pooled features (all positive after ReLU): without it the random
        # head maps every image near one direction and the embeddings start collapsed.
        self.projection = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                        nn.Linear(width, embed_dim))

    def heads(self, features: torch.Tensor) -> ModelOutput:
        """Classifier and embedding from pooled features (B, F); used for feature-space distractors."""
        z = F.normalize(self.projection(features).float(), dim=1)
        return ModelOutput(self.classifier(features), z, features)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return self.heads(self.backbone(x))


def stem(model: NilNet) -> nn.Module:
    """The backbone's stem: its first convolution and the normalisation after it (what fine-tuning
    recipes freeze first: the filters closest to the pixels transfer best)."""
    b = model.backbone
    if isinstance(b, SmallCNN):
        return nn.ModuleList(b.body[:2])
    if isinstance(b, torchvision.models.ResNet):
        return nn.ModuleList([b.conv1, b.bn1])
    if isinstance(b, torchvision.models.DenseNet):
        return nn.ModuleList([b.features.conv0, b.features.norm0])
    if isinstance(b, torchvision.models.EfficientNet):
        return b.features[0]  # Conv2dNormActivation: convolution, BatchNorm, SiLU
    first_conv = getattr(b, "pretrained_cfg", {}).get("first_conv")  # a timm model names its own
    if isinstance(first_conv, str):
        return b.get_submodule(first_conv)
    raise NilError(f"no stem known for backbone {type(b).__name__}")  # pragma: no cover - guarded by MODELS


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    embed_dim: int = 128,
    weights: str | Path | None = None,
    pretrained: bool = False,
) -> NilNet:
    """Build model ``name`` (one of :data:`MODELS`), randomly initialised unless ``weights`` or ``pretrained``.

    ``weights`` is a local state dict: either of a whole ``NilNet`` or of the torchvision backbone
    alone (its ``fc``/``classifier`` entries are ignored). ``pretrained`` loads the backbone's
    published ImageNet weights through torchvision's weights API (downloaded once into its cache;
    see :func:`pretrained_state`). Tensors whose shape the adapted stem changed stay random.
    """
    if name not in MODELS and not is_timm(name):
        raise NilError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}, or timm:NAME")
    if embed_dim < 1:
        raise NilError("--embed-dim must be at least 1")
    if weights is not None and pretrained:
        raise NilError("--pretrained and --weights both choose the starting weights; drop one")
    small = image_size < SMALL_INPUT
    if is_timm(name):
        backbone = _timm_backbone(name, in_channels, pretrained)
        width = backbone.num_features
    elif name == "small_cnn":
        backbone = SmallCNN(in_channels)
        width = backbone.out_features
    else:
        backbone, width = _torchvision_backbone(name, in_channels, small)
    model = NilNet(backbone, width, num_classes, embed_dim)
    if weights is not None:
        load_weights(model, weights)
    elif pretrained and not is_timm(name):  # timm loaded its weights while building
        load_state(model, pretrained_state(name), f"torchvision's ImageNet weights of {name}")
    return model


def is_timm(name: str) -> bool:
    """``timm:NAME``: a backbone from timm's model zoo (the optional ``nil[timm]`` extra)."""
    return name.startswith("timm:")


def _timm():
    try:
        import timm
    except ImportError:
        raise NilError("--model timm:NAME needs the timm package: pip install 'nil[timm]'") from None
    return timm


def _timm_backbone(name: str, in_channels: int, pretrained: bool) -> nn.Module:
    """timm model ``timm:NAME`` without its classifier (forward gives pooled features), through timm's
    own factory and, with ``pretrained``, its own weights cache (the Hugging Face hub's)."""
    timm, arch = _timm(), name.removeprefix("timm:")
    if not timm.list_models(arch, pretrained=False) and not timm.is_model(arch):
        raise NilError(f"timm has no model {arch!r} (timm.list_models() lists them)")
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=0, in_chans=in_channels)
    except Exception as exc:  # offline: huggingface_hub / urllib raise many types
        if not pretrained:
            raise
        raise NilError(f"cannot get the pretrained weights of timm model {arch} ({type(exc).__name__}): without a "
                       "network, pre-fill timm's Hugging Face cache ($HF_HOME, usually ~/.cache/huggingface) on a "
                       "machine that has one, or pass --weights PATH to a local state dict") from None


def timm_normalization(name: str, channels: int) -> dict:
    """The mean and std timm's pretrained weights of ``timm:NAME`` were trained with."""
    cfg = _timm().get_pretrained_cfg(name.removeprefix("timm:")) or None
    mean, std = (cfg.mean, cfg.std) if cfg is not None else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if channels == 1 and len(mean) == 3:  # gray images: luminance-weighted, as for ImageNet's
        mean, std = (sum(w * m for w, m in zip((0.299, 0.587, 0.114), mean)),), (sum(std) / 3,)
    return {"mean": list(mean), "std": list(std)}


def pretrained_state(name: str) -> dict:
    """The published ImageNet weights of torchvision backbone ``name`` (its weights API, its cache).

    Offline and not cached, this ends in one sentence saying where the file goes or how to do without.
    """
    if name not in MODELS or name == "small_cnn":
        raise NilError(f"--pretrained needs a torchvision backbone ({', '.join(m for m in MODELS if m != 'small_cnn')});"
                       f" {name} has no published weights")
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a damaged cached file a RuntimeError
        file = Path(weights.url).name
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        raise NilError(f"cannot get the ImageNet weights of {name} ({getattr(exc, 'reason', exc)}): without a "
                       f"network, put {file} (from {weights.url}) into {folder}, or pass --weights PATH "
                       "to a local state dict") from None


def normalization(kind: str, channels: int) -> dict:
    """Per-channel input mean and std of a fixed kind: ``imagenet`` (what published weights expect) or
    ``half`` (0.5 / 0.5, values in [-1, 1]). The data's own statistics: :func:`nil.data.data_statistics`."""
    if kind == "half":
        return {"mean": [0.5] * channels, "std": [0.5] * channels}
    if kind != "imagenet":
        raise ValueError(f"normalization kind must be imagenet or half, got {kind!r}")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if channels == 1:  # gray images: the luminance-weighted ImageNet statistics
        mean, std = (sum(w * m for w, m in zip((0.299, 0.587, 0.114), mean)),), (sum(std) / 3,)
    return {"mean": list(mean), "std": list(std)}


def load_weights(model: NilNet, path: str | Path) -> None:
    """Load a local state dict into ``model`` (whole model, or backbone only); shape mismatches are skipped."""
    path = Path(path)
    if not path.is_file():
        raise NilError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise NilError(f"cannot read weights file {path}: {exc}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a nil checkpoint
    load_state(model, state, f"weights file {path}")


def load_state(model: NilNet, state: dict, source: str) -> None:
    """Load a state dict of a whole NilNet or of its backbone alone; tensors of another shape are skipped."""
    own = model.state_dict()
    target = model if any(k.startswith("backbone.") for k in state) else model.backbone
    prefix = "" if target is model else "backbone."
    usable = {k: v for k, v in state.items() if prefix + k in own and own[prefix + k].shape == v.shape}
    if not usable:
        raise NilError(f"{source} has no tensor that fits this model")
    missing = target.load_state_dict(usable, strict=False).missing_keys
    LOG.info("loaded %d tensors from %s (%d left at random init)", len(usable), source, len(missing))
