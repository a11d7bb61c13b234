"""Model zoo, user factories, checkpoint loading and teacher metadata."""

import copy
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from zsq.errors import ZsqError
from zsq.models import (
    ModelMeta,
    available_models,
    create_model,
    load_state_dict,
    load_teacher,
    load_weights,
    read_sidecar,
    resnet20,
    resnet32,
)
from zsq.models.cifar_resnet import PadShortcut
from zsq.paths import shared_data_dir

WEIGHTS = shared_data_dir() / "weights"


def shared_file(name: str) -> Path:
    path = WEIGHTS / name
    if not path.is_file():
        pytest.skip(f"shared weights {path} not found (set ZSQ_SHARED_DATA)")
    return path


@pytest.fixture
def user_models_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


# --- CIFAR ResNets --------------------------------------------------------------------------------


def test_resnet20_has_027m_parameters():
    count = sum(p.numel() for p in resnet20().parameters())
    assert round(count / 1e6, 2) == 0.27


@pytest.mark.parametrize(
    ("name", "millions"), [("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85)]
)
def test_deeper_cifar_resnets_parameter_counts(name, millions):
    count = sum(p.numel() for p in create_model(name).parameters())
    assert round(count / 1e6, 2) == millions


@pytest.mark.parametrize(("in_channels", "size"), [(3, 32), (1, 32), (1, 28)])
def test_resnet20_output_shape(in_channels, size):
    model = create_model("resnet20", num_classes=7, in_channels=in_channels).eval()
    assert model(torch.zeros(2, in_channels, size, size)).shape == (2, 7)


def test_resnet20_parameter_names_match_public_checkpoints():
    keys = set(resnet20().state_dict())
    for expected in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer2.2.bn2.bias",
        "layer3.2.conv2.weight",
        "linear.weight",
        "linear.bias",
    ]:
        assert expected in keys
    assert not any("shortcut" in k for k in keys)  # option A has no parameters
    convs = [m for m in resnet20().modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)


def test_every_relu_is_a_separate_module_called_once():
    model = resnet20().eval()
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 9
    assert len({id(m) for m in relus}) == len(relus)
    calls = {id(m): 0 for m in relus}
    for m in relus:
        m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls[id(mod)] + 1))
    model(torch.zeros(1, 3, 32, 32))
    assert set(calls.values()) == {1}


def test_pad_shortcut_subsamples_and_centres_channels():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    y = PadShortcut(2, 6)(x)
    assert y.shape == (1, 6, 2, 2)
    assert torch.equal(y[:, 2:4], x[:, :, ::2, ::2])
    assert y[:, :2].abs().sum() == 0 and y[:, 4:].abs().sum() == 0


def test_cifar_resnet_deepcopies_and_pickles():
    model = resnet20()
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), clone.eval()(x))


# --- create_model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_by_name(name):
    model = create_model(name, num_classes=5).eval()
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


def test_torchvision_model_rejects_other_channel_counts():
    with pytest.raises(ZsqError, match="3 input channels"):
        create_model("resnet18", in_channels=1)


def test_user_factory_gets_num_classes_and_in_channels(user_models_on_path):
    model = create_model("_user_model:tiny", num_classes=4, in_channels=1)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


def test_user_factory_without_arguments(user_models_on_path, caplog):
    with caplog.at_level(logging.WARNING):
        model = create_model("_user_model:tiny_fixed")
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 2)
    assert "does not accept" in caplog.text


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_zsq:fn", "cannot import module"),
        ("_user_model:missing", "no callable 'missing'"),
        ("_user_model:not_a_model", "not a torch.nn.Module"),
        ("_user_model:failing", "model factory _user_model:failing raised RuntimeError: boom"),
        (":fn", "package.module:function"),
    ],
)
def test_user_factory_errors(user_models_on_path, name, message):
    with pytest.raises(ZsqError, match=message):
        create_model(name)


def test_unknown_model_name_lists_choices():
    with pytest.raises(ZsqError) as info:
        create_model("resnet21")
    message = str(info.value)
    for expected in ["resnet20", "resnet32", "resnet44", "resnet56", "torchvision", "module:"]:
        assert expected in message


def test_available_models():
    names = available_models()
    assert names[:4] == ["resnet20", "resnet32", "resnet44", "resnet56"]
    assert "resnet18" in names and "mobilenet_v2" in names


# --- load_weights ---------------------------------------------------------------------------------


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_round_trip(tmp_path):
    source = resnet20()
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    target = resnet20()
    load_weights(target, path)
    assert _same_weights(source, target)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".th"])
def test_torch_checkpoint_layouts(tmp_path, wrapper, suffix):
    source = resnet20()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # DataParallel prefix
    path = tmp_path / f"model{suffix}"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 3}, path)
    target = resnet20()
    load_weights(target, path)
    assert _same_weights(source, target)


def test_checkpoint_without_batchnorm_counters_loads(tmp_path):
    source = resnet20()
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pt")
    load_weights(resnet20(), tmp_path / "old.pt")


def test_missing_weights_file(tmp_path):
    with pytest.raises(ZsqError, match="not found"):
        load_weights(resnet20(), tmp_path / "nope.pt")


@pytest.mark.parametrize("name", ["random.pt", "random.safetensors", "empty.pth"])
def test_corrupt_weights_file_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else os.urandom(4096))
    with pytest.raises(ZsqError, match=name.replace(".", r"\.")):
        load_weights(resnet20(), path)


def test_wrong_class_count_names_tensor_and_shapes(tmp_path):
    torch.save(resnet20(num_classes=10).state_dict(), tmp_path / "c10.pt")
    with pytest.raises(ZsqError) as info:
        load_weights(resnet20(num_classes=100), tmp_path / "c10.pt")
    message = str(info.value)
    assert "linear.weight" in message and "(10, 64)" in message and "(100, 64)" in message
    assert "num_classes" in message  # the CLI spells it --num-classes


def test_key_mismatch_lists_missing_and_unexpected(tmp_path):
    torch.save(resnet32().state_dict(), tmp_path / "r32.pt")
    with pytest.raises(ZsqError) as info:
        load_weights(resnet20(), tmp_path / "r32.pt")
    message = str(info.value)
    assert "unexpected keys [layer1.3.conv1.weight" in message
    assert "more)" in message and "missing keys none" in message


def test_full_pickle_needs_trust(tmp_path):
    source = resnet20()
    torch.save(source, tmp_path / "full.pt")
    with pytest.raises(ZsqError, match="trust_checkpoint=True"):
        load_weights(resnet20(), tmp_path / "full.pt")
    target = resnet20()
    load_weights(target, tmp_path / "full.pt", trust_checkpoint=True)
    assert _same_weights(source, target)


def test_non_state_dict_content(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(ZsqError, match="state_dict"):
        load_weights(resnet20(), tmp_path / "meta.pt")


# --- sidecar and load_teacher ---------------------------------------------------------------------


def _write_sidecar(path: Path, **fields) -> None:
    path.with_suffix(".json").write_text(json.dumps(fields))


def test_read_sidecar(tmp_path):
    weights = tmp_path / "net.pt"
    assert read_sidecar(weights) is None
    _write_sidecar(
        weights,
        num_classes=7,
        in_channels=1,
        normalize_mean=[0.3],
        normalize_std=[0.4],
        test_top1=90.0,
    )
    assert read_sidecar(weights) == ModelMeta(7, 1, (0.3,), (0.4,))


def test_read_sidecar_partial_and_invalid(tmp_path):
    weights = tmp_path / "net.safetensors"
    _write_sidecar(weights, num_classes=5)
    assert read_sidecar(weights) == ModelMeta(num_classes=5)
    _write_sidecar(weights, num_classes="ten")
    with pytest.raises(ZsqError, match="num_classes"):
        read_sidecar(weights)
    weights.with_suffix(".json").write_text("{not json")
    with pytest.raises(ZsqError, match="net.json"):
        read_sidecar(weights)


def test_sidecar_model_name_may_carry_a_note_in_parentheses(tmp_path, caplog):
    weights = tmp_path / "net.pt"
    torch.save(resnet20(num_classes=4).state_dict(), weights)
    _write_sidecar(weights, model="resnet20 (CIFAR, option-A shortcut)", num_classes=4)
    assert read_sidecar(weights).model == "resnet20"
    with caplog.at_level(logging.WARNING):
        load_teacher(None, weights)
        load_teacher("resnet20", weights)
    assert "sidecar names" not in caplog.text
    _write_sidecar(weights, model="resnet 20", num_classes=4)
    with pytest.raises(ZsqError, match="must be a model name"):
        read_sidecar(weights)


def test_load_teacher_uses_sidecar_and_explicit_overrides(tmp_path):
    weights = tmp_path / "teacher.pt"
    torch.save(resnet20(num_classes=4, in_channels=1).state_dict(), weights)
    _write_sidecar(
        weights, num_classes=4, in_channels=1, normalize_mean=[0.5], normalize_std=[0.25]
    )
    model, meta = load_teacher("resnet20", weights)
    assert not model.training
    assert meta == ModelMeta(4, 1, (0.5,), (0.25,))
    _, meta = load_teacher("resnet20", weights, normalize_mean=[0.1], normalize_std=[0.2])
    assert meta.normalize_mean == (0.1,) and meta.normalize_std == (0.2,)


def test_load_teacher_defaults_warn(caplog):
    with caplog.at_level(logging.WARNING):
        model, meta = load_teacher("resnet20")
    assert meta == ModelMeta(10, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert "normalisation" in caplog.text and "randomly initialised" in caplog.text
    assert not model.training


def test_load_teacher_broadcasts_single_value_and_rejects_wrong_length():
    _, meta = load_teacher("resnet20", normalize_mean=[0.5], normalize_std=[0.2])
    assert meta.normalize_mean == (0.5,) * 3 and meta.normalize_std == (0.2,) * 3
    with pytest.raises(ZsqError, match="one value per channel"):
        load_teacher("resnet20", normalize_mean=[0.5, 0.5], normalize_std=[0.2])


def test_load_teacher_wrong_class_count_suggests_flag(tmp_path):
    torch.save(resnet20().state_dict(), tmp_path / "c10.pt")
    with pytest.raises(ZsqError, match="num_classes"):
        load_teacher("resnet20", tmp_path / "c10.pt", num_classes=100)


# --- shared checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_name", "file", "in_channels"),
    [
        ("resnet20", "resnet20_cifar10_akamaster.th", 3),
        ("resnet56", "resnet56_cifar10_akamaster.th", 3),
        ("resnet20", "resnet20_cifar10jpeg.pt", 3),
        ("resnet20", "resnet20_fashionmnist.pt", 1),
    ],
)
def test_shared_checkpoints_load_with_their_sidecars(model_name, file, in_channels):
    model, meta = load_teacher(model_name, shared_file(file))
    assert meta.num_classes == 10 and meta.in_channels == in_channels
    assert len(meta.normalize_mean) == len(meta.normalize_std) == in_channels
    assert model(torch.zeros(1, in_channels, 32, 32)).shape == (1, 10)


# --- weights that are not what they claim (issue 23) -----------------------------------------
def _saved(tmp_path, state, sidecar=None, name="w.pt"):
    path = tmp_path / name
    torch.save(state, path)
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def test_weights_holding_nan_are_refused_naming_the_tensor(tmp_path):
    state = resnet20().state_dict()
    state["layer2.1.conv1.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ZsqError, match="'layer2.1.conv1.weight' holds 1 NaN or infinite"):
        load_state_dict(_saved(tmp_path, state))


def test_an_infinite_mask_buffer_is_a_teachers_own_but_nan_in_it_is_not(tmp_path):
    state = resnet20().state_dict()
    state["attn_mask"] = torch.tensor([0.0, float("-inf")])
    assert torch.equal(load_state_dict(_saved(tmp_path, state))["attn_mask"], state["attn_mask"])
    state["attn_mask"][0] = float("nan")
    with pytest.raises(ZsqError, match="'attn_mask' holds 1 NaN value"):
        load_state_dict(_saved(tmp_path, state, name="nan.pt"))
    for name in ("bn1.running_var", "pos_embed"):  # a buffer, and a parameter of a ViT's
        state = resnet20().state_dict()
        state[name] = state.get(name, torch.zeros(1, 4, 8)).clone()
        state[name].view(-1)[3] = float("inf")
        with pytest.raises(ZsqError, match=f"'{name}' holds 1 NaN or infinite"):
            load_state_dict(_saved(tmp_path, state, name="inf.pt"))


def test_a_sidecar_digest_that_no_longer_matches_is_refused(tmp_path):
    path = _saved(tmp_path, resnet20().state_dict())
    from zsq.io import sha256_file

    path.with_suffix(".json").write_text(json.dumps({"sha256": sha256_file(path)}))
    load_state_dict(path)  # matches
    torch.save(resnet20().state_dict(), path)  # other weights, same name
    with pytest.raises(ZsqError, match="does not match the sha256 its sidecar"):
        load_state_dict(path)


def test_model_and_ema_weights_say_which_is_used_and_the_sidecar_chooses(tmp_path, caplog):
    torch.manual_seed(0)
    model, ema = resnet20().state_dict(), resnet20().state_dict()
    path = _saved(tmp_path, {"model": model, "ema": ema})
    with caplog.at_level(logging.WARNING):
        got = load_state_dict(path)
    assert torch.equal(got["conv1.weight"], model["conv1.weight"])
    assert "holds both 'model' and 'ema' weights; using 'model'" in caplog.text
    path.with_suffix(".json").write_text(json.dumps({"state_dict_key": "ema"}))
    assert torch.equal(load_state_dict(path)["conv1.weight"], ema["conv1.weight"])
