"""Run records: what defines a run, by config field path. Records written by zsq before the
method configs named the CLI's flags; read through ``upgrade`` they equal what this zsq records
for the same command, so those runs still resume, export and analyse.

``tests/data/records_v1.json`` holds such records, made by zsq at commit 9e93d28 for the commands
beside them (teacher digest left out: the test makes the teacher file again).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from zsq.cli import build_parser
from zsq.cli._common import load_teacher, quant_spec
from zsq.cli.quantize import method_config, mixed_config
from zsq.demo import digits_cnn
from zsq.run.record import differences, read_options, run_options, upgrade

RECORDS = json.loads((Path(__file__).parent / "data" / "records_v1.json").read_text())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The files the recorded commands name: the digits teacher and a small npz."""
    tmp = tmp_path_factory.mktemp("v1")
    torch.manual_seed(0)
    save_file(digits_cnn().state_dict(), tmp / "digits.safetensors")
    sidecar = {"num_classes": 10, "in_channels": 1, "normalize_mean": [0.3], "normalize_std": [0.4]}
    (tmp / "digits.json").write_text(json.dumps(sidecar))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (16, 8, 8), np.uint8), np.arange(16) % 10
    np.savez(tmp / "train.npz", x=x, y=y)
    return tmp


def options_now(argv):
    """What this zsq records for ``argv`` (a ``zsq quantize`` command)."""
    args = build_parser().parse_args(argv)
    method = method_config(args, {})
    teacher, meta, shape = load_teacher(args)
    return run_options(
        method,
        quant=quant_spec(args),
        meta=meta,
        image_shape=shape,
        seed=args.seed,
        eval_data=args.eval_data,
        eval_limit=args.eval_limit,
        mixed=mixed_config(args),
    )


@pytest.mark.parametrize("case", sorted(RECORDS))
def test_an_older_record_reads_as_this_zsqs_record_of_the_same_command(case, folder):
    argv = [a.replace("{tmp}", str(folder)) for a in RECORDS[case]["argv"]]
    old = json.loads(json.dumps(RECORDS[case]["options"]).replace("{tmp}", str(folder)))
    now = options_now(argv)
    now.pop("teacher.weights_sha256")
    assert differences(upgrade(old), now) == []
    assert read_options({"options": old}) == upgrade(old)  # no record_version: flags


def test_a_current_record_is_read_as_it_is():
    record = {"record_version": 2, "options": {"method": "gdfq", "seed": 3}}
    assert read_options(record) == {"method": "gdfq", "seed": 3}


def test_differences_name_each_changed_option():
    saved = {"method": "gdfq", "quant.wbits": 4, "seed": 0}
    assert differences(saved, {**saved, "quant.wbits": 3}) == ["quant.wbits 4 -> 3"]
    assert differences(saved, {**saved, "method.init": None}) == []  # newer, unset
    sha = "ab" * 32
    assert differences({"t": sha}, {"t": "cd" * 32}) == [f"t {sha[:12]}... -> cdcdcdcdcdcd..."]


def test_two_spellings_of_one_dataset_are_the_same_option(tmp_path, monkeypatch):
    """A run records a spec as typed; a resume naming the same folder another way continues."""
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    saved = {"eval_data": "cifar10-jpeg:data", "method.calib": "fashion-mnist:data"}
    same = {"eval_data": f"CIFAR10-JPEG:{tmp_path}/data/", "method.calib": "fashion-mnist:link"}
    assert differences(saved, same) == []
    other = {"eval_data": "cifar10:data", "method.calib": "fashion-mnist:elsewhere"}
    assert differences(saved, other) == [
        "eval_data cifar10-jpeg:data -> cifar10:data",
        "method.calib fashion-mnist:data -> fashion-mnist:elsewhere",
    ]
    assert differences({"method.calib": "gdfq"}, {"method.calib": "zeroq"}) != []
