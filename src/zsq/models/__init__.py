"""Model zoo and teacher loading: CIFAR ResNets, torchvision classifiers, user factories."""

from zsq.models.checkpoint import (
    ModelMeta,
    load_state_dict,
    load_teacher,
    load_weights,
    read_sidecar,
    resolve_meta,
    sidecar_path,
)
from zsq.models.cifar_resnet import CifarResNet, resnet20, resnet32, resnet44, resnet56
from zsq.models.registry import (
    CIFAR_MODELS,
    available_models,
    create_model,
    default_image_size,
    input_channels,
)

__all__ = [
    "CIFAR_MODELS",
    "CifarResNet",
    "ModelMeta",
    "available_models",
    "create_model",
    "default_image_size",
    "input_channels",
    "load_state_dict",
    "load_teacher",
    "load_weights",
    "read_sidecar",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resolve_meta",
    "sidecar_path",
]
