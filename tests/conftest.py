import json

import pytest
import torch

from zsq.paths import shared_data_dir


@pytest.fixture(autouse=True, scope="session")
def _own_cache_dir(tmp_path_factory):
    """zsq's user cache (the teacher scores) in a folder of the test session's, not the home."""
    import os

    os.environ["ZSQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("zsq-cache"))


@pytest.fixture
def shared_data():
    """The shared data folder; the test is skipped where it is absent (set ZSQ_SHARED_DATA)."""
    path = shared_data_dir()
    if not (path / "weights").is_dir():
        pytest.skip(f"shared data not found at {path} (set ZSQ_SHARED_DATA)")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def small_teacher(tmp_path):
    """The demo's digits CNN (random init: the mechanics do not need accuracy) with a sidecar."""
    from safetensors.torch import save_file

    from zsq.demo import digits_cnn

    torch.manual_seed(0)
    weights = tmp_path / "digits.safetensors"
    save_file(digits_cnn().state_dict(), weights)
    sidecar = {"num_classes": 10, "in_channels": 1, "normalize_mean": [0.3], "normalize_std": [0.4]}
    (tmp_path / "digits.json").write_text(json.dumps(sidecar))
    return ["--model", "zsq.demo:digits_cnn", "--weights", str(weights), "--image-size", "8"]
