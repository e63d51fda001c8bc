"""The project's model, named by one string:

``NAME``
    a 2-D classification model of our registry (``gradnorm-al list``: ``smallcnn``,
    ``resnet18``, ...), built for the project's classes and RGB input;
``torchvision:NAME``
    any torchvision classification model (``torchvision.models.list_models()``), randomly
    initialised, its last linear layer replaced by one for the project's classes; it becomes a
    :class:`~gradnorm_al.models.TaskModel` whose ``embed`` is what that layer saw (so core-set,
    BADGE and the like work on it);
``module:factory``
    ``factory(num_classes=K)`` from an importable module (on ``PYTHONPATH``), returning any
    ``nn.Module`` whose output is the logits.

Pretrained weights come from a local file (never downloaded), loaded with
``torch.load(weights_only=True)``: a state dict, or a dict holding one under ``state_dict`` or
``model``. Its entries for the model's last linear layer are ignored (that layer is the new one
for the project's classes); every other entry must match the model exactly.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from .._torch import first_output
from ..errors import ConfigError, UnknownNameError
from ..models import MODELS, SEGMENTATION_MODELS, VOLUME_MODELS, TaskModel, create_model

TORCHVISION = "torchvision:"


class TorchvisionClassifier(TaskModel):
    """A torchvision classifier split at its last linear layer: ``backbone`` (the network with
    that layer made an identity) and a new ``classifier`` for ``num_classes``."""

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        name, head = last_linear(net)
        _set_submodule(net, name, nn.Identity())
        self.backbone = net
        self.feature_dim = head.in_features
        self.classifier = nn.Linear(head.in_features, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return first_output(self.backbone(x))


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the last ``nn.Linear`` of ``model`` in module order."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear layer to replace for the project's classes"
        )
    return found[-1]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def check_spec(spec: str) -> None:
    """:class:`ConfigError` unless ``spec`` names a model this module can build (without
    building it: registry and torchvision names are looked up, a factory is imported)."""
    if spec.startswith(TORCHVISION):
        import torchvision.models

        name = spec[len(TORCHVISION) :]
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            raise UnknownNameError(
                f"unknown torchvision classification model {name!r}; e.g. resnet18, resnet50, "
                "mobilenet_v3_small (torchvision.models.list_models() lists them all)"
            )
    elif ":" in spec:
        _factory(spec)
    else:
        MODELS.get(spec)  # the unknown-name error lists the registry
        if spec in SEGMENTATION_MODELS or spec in VOLUME_MODELS:
            raise ConfigError(
                f"model {spec!r} is not a 2-D image classifier; a labelling project needs one "
                "(e.g. smallcnn, resnet18, torchvision:resnet18)"
            )


def _factory(spec: str):  # noqa: ANN202 (any callable)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"model {spec!r}: cannot import module {module_name!r} ({err}); put it on "
            "PYTHONPATH, or name a registry model (gradnorm-al list) or torchvision:NAME"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model {spec!r}: {module_name} has no function {attr!r}")
    return factory


def build_model(spec: str, num_classes: int, weights: Path | None = None) -> nn.Module:
    """The model named by ``spec`` for ``num_classes`` classes and RGB images, initialised from
    ``weights`` (a local file) where given."""
    check_spec(spec)
    if spec.startswith(TORCHVISION):
        import torchvision.models

        net = torchvision.models.get_model(spec[len(TORCHVISION) :], weights=None)
        if weights is not None:
            load_weights(net, weights)
        return TorchvisionClassifier(net, num_classes)
    if ":" in spec:
        model = _factory(spec)(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model {spec!r} returned a {type(model).__name__}, not a torch nn.Module"
            )
    else:
        model = create_model(spec, num_classes=num_classes, in_channels=3)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load the state dict in the file ``path`` into ``model``, its last linear layer excepted
    (see the module docstring)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"weights file {path} not found") from None
    except Exception as err:
        raise ConfigError(
            f"cannot read weights file {path} ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); it must be a torch state dict saved with "
            "torch.save (loaded with weights_only=True)"
        ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {path} holds no state dict of tensors")
    head, _ = last_linear(model)
    head_keys = {f"{head}.weight", f"{head}.bias"}
    state = {k: v for k, v in state.items() if k not in head_keys}
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - head_keys)
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape", wrong),
        ):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})")
        raise ConfigError(
            f"weights file {path} does not fit model {type(model).__name__}: "
            f"{'; '.join(parts)}; give the weights of this architecture"
        )
    model.load_state_dict(state, strict=False)
