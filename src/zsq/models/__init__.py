"""Model zoo and teacher loading: CIFAR ResNets, torchvision and timm classifiers, user
factories."""

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
    TIMM_PREFIX,
    available_models,
    create_model,
    default_image_size,
    input_channels,
    is_timm_name,
)

__all__ = [
    "CIFAR_MODELS",
    "CifarResNet",
    "ModelMeta",
    "TIMM_PREFIX",
    "available_models",
    "create_model",
    "default_image_size",
    "input_channels",
    "is_timm_name",
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
