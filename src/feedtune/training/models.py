"""Model factory: a small CNN that trains in minutes on a laptop, a torchvision or timm model, or
a user's ``module.path:callable`` factory (``external_models``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from feedtune.config import ModelConfig
from feedtune.training.external_models import (
    TIMM_PREFIX,
    build_factory,
    build_timm,
    is_factory,
)

log = logging.getLogger(__name__)

# The ModelConfig fields that decide the shape of the weights: a checkpoint records exactly
# these (``model_args``) and a model is rebuilt from them alone.
ARCHITECTURE_KEYS = ("name", "width", "depth", "kwargs")


def model_source(name: str) -> str:
    """Where ``model.name``'s network comes from: small_cnn, torchvision, timm or factory."""
    if name == "small_cnn":
        return "small_cnn"
    if name.startswith(TIMM_PREFIX):
        return "timm"
    return "factory" if is_factory(name) else "torchvision"


def model_args(cfg: ModelConfig) -> dict[str, object]:
    """``cfg``'s architecture-deciding fields, as a checkpoint stores them, and their source
    (so a reader sees which library, or whose code, rebuilds the network)."""
    args: dict[str, object] = {key: getattr(cfg, key) for key in ARCHITECTURE_KEYS}
    args["kwargs"] = dict(cfg.kwargs)
    return {**args, "source": model_source(cfg.name)}


class SmallCNN(nn.Module):
    """``depth`` conv blocks (conv, BN, ReLU, 2x max-pool) and a linear head; fast on 2 cores.

    Channels are ``width``, ``2 * width``, then ``4 * width`` for every further block. Each block
    doubles the receptive field: with 5 blocks the last one sees 63 px, a whole 64 px image, so
    the head pools whole-shape features rather than a bag of corners and edges (4 blocks see
    31 px, less than most objects; on ``shapes`` that learned ~1.5x slower, BENCHMARKS.md
    "Default recipe"). ``ceil_mode`` pooling keeps a 1x1 map 1x1, so any image size works.
    """

    def __init__(
        self, num_classes: int, *, dropout: float = 0.2, width: int = 24, depth: int = 5
    ) -> None:
        super().__init__()
        chans = [3] + [width * min(2**i, 4) for i in range(depth)]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(chans[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class StandIn(nn.Module):
    """A model that eats ``samples_per_s`` samples per second without using the CPU, as a GPU
    step does. What-if for ``feedtune bench``: would this loader keep a faster model fed?

    Each batch occupies a virtual device for its share of a second. As on a GPU, whose
    kernels run after the host has queued them, the host waits only when the device is still
    busy with the previous batch: the host's own work for a step (fetching the batch, the
    optimizer's bookkeeping) overlaps the device's work, and a step costs ``batch /
    samples_per_s`` seconds whenever the host keeps up. A tiny linear head gives the loss a
    gradient and the optimizer a step."""

    def __init__(self, num_classes: int, *, samples_per_s: float) -> None:
        super().__init__()
        self.samples_per_s = samples_per_s
        self.head = nn.Linear(3, num_classes)
        self._busy_until = 0.0  # perf_counter time at which the virtual device is free

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        now = time.perf_counter()
        if self._busy_until > now:
            time.sleep(self._busy_until - now)
            now = self._busy_until
        self._busy_until = now + x.shape[0] / self.samples_per_s
        return self.head(x.float().mean(dim=(2, 3)))


def _head_path(model: nn.Module) -> str:
    """Attribute name of the classification head for the families we support."""
    for name in ("classifier", "fc", "head", "heads"):
        if hasattr(model, name):
            return name
    raise ValueError(
        f"cannot find the classification head of {type(model).__name__}, which freezing and "
        "finetuning need: name it classifier, fc, head or heads, or give the model "
        "get_classifier() and reset_classifier(n)"
    )


def _has_classifier_api(model: nn.Module) -> bool:
    """timm's interface (any model may offer it): ``get_classifier()`` returns the head and
    ``reset_classifier(n)`` replaces it, whatever the family calls it."""
    return callable(getattr(model, "get_classifier", None)) and callable(
        getattr(model, "reset_classifier", None)
    )


def _head(model: nn.Module) -> nn.Module:
    if _has_classifier_api(model):
        return model.get_classifier()
    return getattr(model, _head_path(model))


def _last_linear(module: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent, attribute, layer) of the last nn.Linear inside ``module``."""
    found = None
    for parent in module.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (parent, attr, child)
    if found is None:
        raise ValueError(f"no linear layer in head {type(module).__name__}")
    return found


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's named head (``_head_path``, or timm's
    ``get_classifier()``); a ``ValueError`` that says what to name when it has none."""
    return list(_head(model).parameters())


def optimizer_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the optimizer's head group: the named head's, else the model's last
    ``nn.Linear``'s (logged as the guess it is), else none (one group for the whole model,
    logged too). A plain train needs no head; freezing and finetuning do."""
    try:
        return head_parameters(model)
    except ValueError:
        pass
    kind = type(model).__name__
    needs = "freezing and finetuning need it named classifier, fc, head or heads"
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        log.info("%s: no classification head, no nn.Linear: one parameter group (%s)", kind, needs)
        return []
    name, linear = linears[-1]
    log.info(
        "%s: no named head; its last nn.Linear '%s' is taken as the head (%s)", kind, name, needs
    )
    return list(linear.parameters())


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """A new head with ``num_classes`` outputs: ``reset_classifier`` where the model has it,
    else the last linear layer of the head is swapped."""
    if _has_classifier_api(model):
        model.reset_classifier(num_classes)
        return model
    head = getattr(model, _head_path(model))
    if isinstance(head, nn.Linear):
        setattr(model, _head_path(model), nn.Linear(head.in_features, num_classes))
        return model
    parent, attr, linear = _last_linear(head)
    setattr(parent, attr, nn.Linear(linear.in_features, num_classes))
    return model


def num_outputs(model: nn.Module) -> int:
    head = _head(model)
    return head.out_features if isinstance(head, nn.Linear) else _last_linear(head)[2].out_features


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze everything but the head (the head always trains)."""
    head = {id(p) for p in head_parameters(model)}
    for param in model.parameters():
        if id(param) not in head:
            param.requires_grad_(trainable)


def _cached_weights(name: str) -> Path:
    """Path of the torchvision weights for ``name`` in the local torch cache, or a clear error."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    filename = Path(weights.url).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"model.pretrained: weights for '{name}' are not in the local torch cache ({path}); "
            "feedtune never downloads: copy the file there or set model.pretrained: false"
        )
    return path


def _small_cnn(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.pretrained:
        raise ValueError("model.pretrained: small_cnn has no pretrained weights; use false")
    return SmallCNN(num_classes, dropout=cfg.dropout, width=cfg.width, depth=cfg.depth)


def _torchvision(cfg: ModelConfig, num_classes: int) -> nn.Module:
    from torchvision.models import get_model, list_models

    allowed = list_models(module=__import__("torchvision").models)
    if cfg.name not in allowed:
        shown = ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny")
        raise ValueError(
            f"model.name: unknown model '{cfg.name}'; allowed: small_cnn, "
            + ", ".join(n for n in allowed if n in shown)
            + ", ... (any torchvision classification model), timm/<name>, module.path:callable"
        )
    model = get_model(cfg.name, weights=None)
    if cfg.pretrained:
        state = torch.load(_cached_weights(cfg.name), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    if num_outputs(model) != num_classes:
        replace_head(model, num_classes)
    return model


def _timm(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return build_timm(
        cfg.name, num_classes=num_classes, pretrained=cfg.pretrained, kwargs=cfg.kwargs
    )


def _factory(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.pretrained:
        raise ValueError(f"model.pretrained: {cfg.name} loads its own weights, if any; use false")
    model = build_factory(cfg.name, num_classes=num_classes, kwargs=cfg.kwargs)
    try:
        outputs = num_outputs(model)
    except ValueError:  # no head we can find: fine until freezing or finetuning needs one
        return model
    if outputs != num_classes:
        raise ValueError(
            f"model.name: {cfg.name}(num_classes={num_classes}) built a head with {outputs} "
            "outputs; the factory must size its head from num_classes"
        )
    return model


_BUILDERS = {
    "small_cnn": _small_cnn,
    "torchvision": _torchvision,
    "timm": _timm,
    "factory": _factory,
}


def build_model(cfg: ModelConfig, *, num_classes: int) -> nn.Module:
    """The network ``model.name`` names (``model_source``), head sized to ``num_classes``."""
    source = model_source(cfg.name)
    if cfg.kwargs and source not in ("timm", "factory"):
        raise ValueError(
            f"model.kwargs: only timm/<name> and module.path:callable models take kwargs, "
            f"not {cfg.name}; remove them"
        )
    model = _BUILDERS[source](cfg, num_classes)
    if cfg.freeze == "backbone":
        try:
            set_backbone_trainable(model, False)
        except ValueError as exc:
            raise ValueError(f"model.freeze=backbone: {exc}") from exc
    return model
