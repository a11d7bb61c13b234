"""The method registry: every registered method runs through the API and the CLI and resumes; a
method defined in this file alone runs through both; a run validates each thing once."""

import json
from dataclasses import dataclass, fields

import pytest
import torch
from safetensors.torch import save_file

import zsq
from zsq.cli import main
from zsq.demo import digits_cnn
from zsq.errors import ConfigError, ZsqError
from zsq.methods import (
    MethodConfig,
    MethodHandler,
    Outcome,
    get_method,
    method_names,
    register_method,
    unregister_method,
)
from zsq.models.introspect import NEEDS
from zsq.synth import source_needs

CNN_SIDECAR = {"num_classes": 10, "in_channels": 1, "normalize_mean": [0.3], "normalize_std": [0.4]}
VIT_KWARGS = {
    "img_size": 8,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 16,
    "depth": 1,
    "num_heads": 2,
}


def needs(config: MethodConfig) -> set[str]:
    return {source_needs(source) for source, _ in config.sample_sources()} & set(NEEDS)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A digits CNN (BatchNorm) and, where timm is installed, a tiny ViT (attention): random
    weights saved with their sidecars, as the CLI reads a teacher."""
    folder = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    cnn = digits_cnn().eval()
    save_file(cnn.state_dict(), folder / "cnn.safetensors")
    (folder / "cnn.json").write_text(json.dumps({**CNN_SIDECAR, "model": "zsq.demo:digits_cnn"}))
    made = {"batchnorm": folder / "cnn.safetensors"}
    try:
        import timm  # noqa: F401
    except ImportError:
        return made
    from zsq.models import create_model

    vit = create_model("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1,
                       model_kwargs=VIT_KWARGS)  # fmt: skip
    save_file(vit.state_dict(), folder / "vit.safetensors")
    sidecar = {**CNN_SIDECAR, "model": "timm:vit_tiny_patch16_224", "model_kwargs": VIT_KWARGS}
    (folder / "vit.json").write_text(json.dumps(sidecar))
    made["attention"] = folder / "vit.safetensors"
    return made


def teacher_for(config: MethodConfig, teachers):
    need = (needs(config) or {"batchnorm"}).pop()
    if need not in teachers:
        pytest.skip(f"no {need} teacher here (timm missing)")
    from zsq.models import load_teacher

    teacher, meta = load_teacher(None, teachers[need], image_size=8)
    return teacher, meta, teachers[need]


def cli_flags(config: MethodConfig) -> list[str]:
    """The config as ``zsq quantize`` flags: the method, then every field that differs from
    its default as ``--method-opt FIELD=JSON``."""
    default = type(config)()
    flags = ["--method", config.method]
    for f in fields(config):
        value = getattr(config, f.name)
        if f.init and value != getattr(default, f.name):
            flags += ["--method-opt", f"{f.name}={json.dumps(value)}"]
    return flags


def interrupt_after_the_method(monkeypatch, name):
    """Stop the run as Ctrl-C would, once the method has done its work but before the run's
    files are written: what it kept in the run folder decides whether the run can resume."""
    handler = get_method(name).handler
    run = type(handler).run

    def stopping(self, config, ctx):
        run(self, config, ctx)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(handler), "run", stopping)


@pytest.mark.parametrize("name", method_names())
def test_every_method_runs_through_the_api_and_the_cli_and_resumes(
    name, teachers, tmp_path, monkeypatch, capsys
):
    config = get_method(name).config.smoke()
    teacher, meta, weights = teacher_for(config, teachers)
    options = {"image_shape": (1, 8, 8), "num_classes": 10, "meta": meta, "device": "cpu"}
    api = zsq.quantize(teacher, config, **options, work_dir=tmp_path / "api", progress=False)
    assert api.report["method"].removesuffix("+ait") == name
    assert json.loads((tmp_path / "api" / "report.json").read_text()) == api.report

    argv = ["quantize", "--weights", str(weights), "--image-size", "8", *cli_flags(config)]
    argv += ["--device", "cpu", "--quiet", "--json"]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == api.report["method"] and report["sessions"]
    for key in ("calibration", "real_data", "wbits", "abits", "model", "quant_spec", "sizes"):
        assert report[key] == api.report[key], key
    student = (tmp_path / "cli" / "student.safetensors").read_bytes()
    assert student == (tmp_path / "api" / "student.safetensors").read_bytes()  # the same run

    with monkeypatch.context() as patch:
        interrupt_after_the_method(patch, name)
        assert main([*argv, "--out", str(tmp_path / "stopped")]) == 130
    capsys.readouterr()
    kept = (tmp_path / "stopped.partial" / "checkpoint" / "last.pt").is_file()
    assert kept or not (tmp_path / "stopped.partial").exists()
    if get_method(name).family == "distillation":
        assert kept, "a distillation keeps a checkpoint every epoch"
    if kept:
        assert main([*argv, "--resume", str(tmp_path / "stopped")]) == 0
        resumed = json.loads(capsys.readouterr().out)
        assert len(resumed["sessions"]) == 2
        ours = (tmp_path / "stopped" / "student.safetensors").read_bytes()
        assert ours == (tmp_path / "cli" / "student.safetensors").read_bytes()


# --- a method from this file alone -------------------------------------------------------------
@dataclass(frozen=True)
class Toy(MethodConfig):
    """Min/max on Gaussian noise scaled by ``scale``."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise ConfigError(f"«scale» must be a number > 0, got {self.scale!r}")


class ToyHandler(MethodHandler):
    writes = ("toy.json",)

    def run(self, config: Toy, ctx) -> Outcome:
        from zsq.ptq import gaussian_batches, minmax_quantize

        noise = (x * config.scale for x in gaussian_batches(16, ctx.image_shape, seed=ctx.seed))
        student = minmax_quantize(ctx.teacher, ctx.quant, noise, device=ctx.device)
        if ctx.layout is not None:
            (ctx.layout / "toy.json").write_text(json.dumps({"scale": config.scale}))
        return Outcome(student, {"calibration": f"gaussian noise x {config.scale}"})


@pytest.fixture
def toy():
    register_method("toy", Toy, ToyHandler(), summary="a test's own method", family="test")
    yield Toy
    unregister_method("toy")


def test_a_method_registered_here_runs_through_the_cli_and_the_api(toy, teachers, tmp_path, capsys):
    weights = teachers["batchnorm"]
    argv = ["quantize", "--weights", str(weights), "--image-size", "8", "--method", "toy"]
    argv += ["--device", "cpu", "--quiet", "--json"]
    out = tmp_path / "toy"
    assert main([*argv, "--method-opt", "scale=2", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "toy" and report["calibration"] == "gaussian noise x 2"
    assert json.loads((out / "toy.json").read_text()) == {"scale": 2}
    assert json.loads((out / ".zsq-run").read_text())["options"]["method.scale"] == 2
    # its own file is zsq's: --overwrite replaces the folder; the refusals name its flags
    assert main([*argv, "--method-opt", "scale=3", "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert main([*argv, "--method-opt", "scale=-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--method-opt scale must be a number > 0" in capsys.readouterr().err
    assert main([*argv, "--ait", "--out", str(tmp_path / "bad")]) == 2
    assert "--ait has no effect with --method toy" in capsys.readouterr().err
    from zsq.models import load_teacher

    teacher, meta = load_teacher(None, weights, image_size=8)
    api = zsq.quantize(teacher, Toy(scale=2), image_shape=(1, 8, 8), num_classes=10,
                       device="cpu", progress=False)  # fmt: skip
    assert api.report["calibration"] == "gaussian noise x 2"
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_an_unregistered_config_is_a_one_line_error(teachers):
    from zsq.models import load_teacher

    teacher, _ = load_teacher(None, teachers["batchnorm"], image_size=8)
    with pytest.raises(ZsqError, match="Toy is not the config of a registered method"):
        zsq.quantize(teacher, Toy(), image_shape=(1, 8, 8), num_classes=10)


# --- validation once per run -------------------------------------------------------------------
VALIDATORS = [
    ("zsq.methods.distillation", "Distillation.__post_init__"),
    ("zsq.methods.distillation", "Distillation._resolve_recipe"),
    ("zsq.run.quantize", "_plan"),
    ("zsq.run.quantize", "_check_teacher"),
    ("zsq.run.quantize", "check_layer_patterns"),
    ("zsq.methods.distillation", "check_source_options"),
    ("zsq.run.quantize", "require_fit"),
    ("zsq.io", "check_output_dir"),
    ("zsq.run.record", "sessions_before"),
]


@pytest.fixture
def spies(monkeypatch):
    """Each validator wrapped to count its calls (module attribute or class method)."""
    import importlib

    counts = {}
    for module_name, path in VALIDATORS:
        owner = importlib.import_module(module_name)
        *classes, name = path.split(".")
        for cls in classes:
            owner = getattr(owner, cls)
        original = getattr(owner, name)
        counts[path] = 0

        def spy(*args, _original=original, _path=path, **kwargs):
            counts[_path] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    return counts


@pytest.mark.parametrize("front", ["api", "cli"])
def test_each_validation_runs_once_per_run(front, spies, teachers, tmp_path, monkeypatch, capsys):
    from zsq.distill import Distiller

    out = tmp_path / "run"
    weights = teachers["batchnorm"]
    schedule = ["epochs=3", "iters_per_epoch=2", "batch_size=4", "gen_warmup_epochs=1"]
    schedule += ["act_calib_epochs=1", "probe_batch_size=8"]
    argv = ["quantize", "--weights", str(weights), "--image-size", "8", "--method", "gdfq"]
    argv += ["--recipe", "demo", *(a for s in schedule for a in ("--set", s)), "--quiet"]
    argv += ["--device", "cpu"]
    train_epoch = Distiller.train_epoch

    def stopping(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, epoch)

    with monkeypatch.context() as patch:  # a resumed run: the resume record is checked too
        patch.setattr(Distiller, "train_epoch", stopping)
        assert main([*argv, "--out", str(out)]) == 130
    capsys.readouterr()
    for path in spies:
        spies[path] = 0
    if front == "cli":
        assert main([*argv, "--resume", str(out)]) == 0
    else:
        from zsq.models import load_teacher
        from zsq.recipes import parse_overrides

        teacher, meta = load_teacher(None, weights, image_size=8)
        method = zsq.GDFQ(recipe="demo", overrides=parse_overrides(schedule))
        zsq.quantize(teacher, method, image_shape=(1, 8, 8), num_classes=10, meta=meta,
                     device="cpu", progress=False, work_dir=out, resume=True)  # fmt: skip
    assert spies == {path: 1 for path in spies}, spies


def test_the_readme_lists_every_registered_method():
    """The README's table of method configs and its method list come from the registry."""
    from zsq.paths import repo_root

    readme = (repo_root() / "README.md").read_text()
    for name in method_names():
        config = get_method(name).config
        if config.__module__.startswith("zsq.methods."):
            assert f"`zsq.{config.__name__}(" in readme, config.__name__
            assert f"`{name}`" in readme, name
