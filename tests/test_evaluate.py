"""evaluate(): exact counts on hand-made logits, then the shared teachers' known accuracies."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from zsq.data import head, load_dataset
from zsq.errors import ZsqError
from zsq.evaluate import EvalResult, evaluate
from zsq.models import load_teacher
from zsq.paths import shared_data_dir

SHARED = shared_data_dir()


def shared_path(relative: str):
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"shared data {path} not found (set ZSQ_SHARED_DATA)")
    return path


class NearestClass(nn.Module):
    """Predicts the class in x[:, 0]; ranks the others by distance to it (a known top-k)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classes = torch.arange(self.num_classes, dtype=torch.float32, device=x.device)
        # tiny class-dependent offset breaks ties between the neighbours below and above
        return -(classes - x[:, :1]).abs() - 1e-3 * classes


def _dataset(predicted: list[int], labels: list[int]) -> TensorDataset:
    return TensorDataset(
        torch.tensor(predicted, dtype=torch.float32)[:, None], torch.tensor(labels)
    )


def test_counts_top1_and_top5():
    # predicting 5: top-5 is {3, 4, 5, 6, 7}; labels: 6 exact, 2 near (in top-5), 2 far
    ds = _dataset([5] * 10, [5] * 6 + [3, 7] + [0, 9])
    result = evaluate(NearestClass(10), ds, batch_size=3, device="cpu", progress=False)
    assert result == EvalResult(top1=60.0, top5=80.0, n=10)


def test_top5_with_fewer_than_five_classes():
    result = evaluate(NearestClass(3), _dataset([0, 1, 2, 0], [0, 2, 0, 1]), progress=False)
    assert result.top1 == 25.0 and result.top5 == 100.0 and result.n == 4


def test_restores_training_mode_and_runs_without_grad():
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 4))
    model.train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, o.requires_grad)))
    evaluate(model, _dataset([0, 1], [0, 1]), progress=False)
    assert seen == [(False, False)] and model.training


def test_tuple_output_uses_first_element():
    class TupleModel(NearestClass):
        def forward(self, x):
            return super().forward(x), torch.zeros(1)

    result = evaluate(TupleModel(10), _dataset([1, 2], [1, 3]), progress=False)
    assert result.top1 == 50.0


def test_errors():
    with pytest.raises(ZsqError, match="empty"):
        evaluate(NearestClass(3), _dataset([], []), progress=False)
    with pytest.raises(ZsqError, match="logits"):
        evaluate(nn.Sequential(nn.Flatten(), _Dict()), _dataset([0], [0]), progress=False)


class _Dict(nn.Module):
    def forward(self, x):
        return {"out": x}


def test_leaves_the_random_number_generators_alone():
    """A run that evaluates on schedule must end as one that does not (same RNG stream)."""
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(1, 4))  # eval: no draws
    torch.manual_seed(3)
    state = torch.get_rng_state()
    evaluate(model, _dataset([0, 1, 2], [0, 1, 2]), batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_channel_mismatch_is_a_one_line_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    gray = TensorDataset(torch.zeros(2, 1, 5, 5), torch.tensor([0, 1]))
    with pytest.raises(ZsqError, match="1 channel.*takes 3"):
        evaluate(model, gray, progress=False)


def test_progress_bar_runs(capsys):
    evaluate(NearestClass(3), _dataset([0, 1], [0, 1]), progress=True)
    assert "eval" in capsys.readouterr().err


# --- shared teachers ------------------------------------------------------------------------------


def _teacher_accuracy(weights: str, spec: str, limit: int | None = None) -> EvalResult:
    model, meta = load_teacher("resnet20", shared_path(weights))
    ds = load_dataset(spec, normalize_mean=meta.normalize_mean, normalize_std=meta.normalize_std)
    return evaluate(model, head(ds, limit) if limit else ds, device="cpu", progress=False)


def test_akamaster_resnet20_exact_cifar10_subset():
    data = shared_path("cifar10-exact/test_first846.npz")
    result = _teacher_accuracy("weights/resnet20_cifar10_akamaster.th", f"npz:{data}")
    assert result.n == 846 and round(result.top1, 2) == 91.73  # 776 / 846


def test_fashion_mnist_teacher():
    data = shared_path("fashion-mnist")
    result = _teacher_accuracy("weights/resnet20_fashionmnist.pt", f"fashion-mnist:{data}", 1000)
    assert result.n == 1000 and result.top1 > 90


def test_cifar10_jpeg_teacher():
    data = shared_path("cifar10-jpeg")
    result = _teacher_accuracy("weights/resnet20_cifar10jpeg.pt", f"cifar10-jpeg:{data}", 1000)
    assert result.n == 1000 and result.top1 > 80


def test_image_folder_scores_as_the_same_images_in_an_npz(tmp_path, capsys):
    """200 CIFAR-10 test images as PNG class folders and as an npz: the same top-1 for the public
    ResNet-20 (before the fix, the folder was resized to 224 and scored 12%)."""
    import json

    import numpy as np
    from PIL import Image

    from zsq.cli import main

    weights = shared_path("weights/resnet20_cifar10_akamaster.th")
    with np.load(shared_path("cifar10-exact/test_first846.npz")) as arrays:
        x, y, names = arrays["x"][:200], arrays["y"][:200], arrays["label_names"]
    assert list(names) == sorted(names)  # folder order = label order
    np.savez(tmp_path / "first200.npz", x=x, y=y)
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = tmp_path / "folder" / str(names[label])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    scores = {}
    for spec in (f"npz:{tmp_path / 'first200.npz'}", f"imagefolder:{tmp_path / 'folder'}"):
        argv = ["eval", "--model", "resnet20", "--weights", str(weights), "--data", spec]
        assert main([*argv, "--json", "--quiet", "--device", "cpu"]) == 0
        scores[spec.split(":")[0]] = json.loads(capsys.readouterr().out)
    assert scores["imagefolder"]["top1"] == scores["npz"]["top1"] == 91.0
    assert scores["imagefolder"]["n"] == 200 and scores["imagefolder"]["image_shape"] == [3, 32, 32]
    assert "resize shorter side to 32" in scores["imagefolder"]["eval_transform"]
