"""Block reconstruction (issue 25): the rounding arithmetic against hand values, the units found in
real architectures, Genie's swing convolution, and the method end to end (export, resume,
a distillation started from it)."""

import json
import math

import pytest
import torch
from tests._interrupt import interrupt_at_call
from tests._teachers import tiny_teacher
from torch import nn

import zsq
from zsq.methods.genie import genie_spec
from zsq.ptq.blocks import find_blocks
from zsq.ptq.reconstruct import (
    LearnedStep,
    ReconstructionConfig,
    SoftRounding,
    mixed_inputs,
    reconstruction_error,
)
from zsq.ptq.rounding import (
    beta_at,
    inverse_rectified_sigmoid,
    keep_mask,
    learned_step_quantize,
    lp_grid,
    rectified_sigmoid,
    round_ste,
    rounding_regularizer,
)
from zsq.quant import QuantSpec, act_quantizers, quant_layers, quantize_model
from zsq.synth.genie import std_mean, swing

SMALL = {"image_shape": (3, 8, 8), "num_classes": 10, "device": "cpu", "progress": False}


# --- the arithmetic -------------------------------------------------------------------------
def test_rectified_sigmoid_and_its_inverse_by_hand():
    v = torch.tensor([0.0, 100.0, -100.0, math.log(3.0)])
    # 1.2 * sigmoid(v) - 0.1: 0.5 at 0, clamped to 1 and 0 far out, 1.2 * 0.75 - 0.1 = 0.8
    assert torch.allclose(rectified_sigmoid(v), torch.tensor([0.5, 1.0, 0.0, 0.8]))
    h = torch.tensor([0.05, 0.5, 0.93])
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-6)


def test_rounding_regularizer_by_hand():
    h = torch.tensor([0.0, 1.0, 0.5, 0.75])
    # 1 - |2h - 1|^2: 0, 0, 1, 1 - 0.25
    assert float(rounding_regularizer(h, 2.0)) == pytest.approx(1.75)
    # beta 20: |0.5|^20 is tiny, so 0.75 costs almost 1
    assert float(rounding_regularizer(h, 20.0)) == pytest.approx(2.0 - 0.5**20)


def test_beta_is_held_through_the_warm_up_then_annealed_linearly():
    assert beta_at(1, 100) == 20.0 and beta_at(19, 100) == 20.0
    assert beta_at(20, 100) == 20.0  # the decay starts at 20% of the steps
    assert beta_at(60, 100) == pytest.approx(2 + 18 * 0.5)
    assert beta_at(100, 100) == pytest.approx(2.0)


def test_learned_step_gradient_is_lsqs_by_hand():
    """d x'/d step = round(u) - u inside the range (u = x / step - z), the bound outside it."""
    x = torch.tensor([0.3, 1.7, -2.5, 10.0])
    step = torch.tensor(0.5, requires_grad=True)
    zero = torch.tensor(0.0)
    out = learned_step_quantize(x, step, zero, 4)  # codes -8..7
    assert torch.allclose(out, torch.tensor([0.5, 1.5, -2.5, 3.5]))
    (out * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    # u = 0.6, 3.4, -5 inside: round(u) - u = 0.4, -0.4, 0; u = 20 is clipped to 7
    expected = 1 * 0.4 + 2 * (-0.4) + 3 * 0.0 + 4 * 7.0
    assert float(step.grad) == pytest.approx(expected, abs=1e-5)


def test_learned_step_per_channel_gradients_equal_autograd_through_rounding():
    """The hand-written backward against autograd through round/clamp, steps per channel."""
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5) * 2).requires_grad_()
    step = (torch.rand(1, 3, 1, 1) + 0.1).requires_grad_()
    zero = torch.tensor([[[[0.0]], [[8.0]], [[-1.0]]]])
    # autograd's round_ste lands a hair off the bound codes (u + (round(u) - u) != round(u)),
    # which clamp's backward then calls outside: keep the codes -8 and 7 out of the test
    on_bound = ((x / step - zero).round().abs() - 7.5).abs() == 0.5
    x = torch.where(on_bound, 30 * step, x).detach().requires_grad_()
    weight = torch.randn(4, 3, 5, 5)
    (learned_step_quantize(x, step, zero, 4) * weight).sum().backward()
    x2, step2 = x.detach().clone().requires_grad_(), step.detach().clone().requires_grad_()
    reference = (torch.clamp(round_ste(x2 / step2 - zero), -8, 7) + zero) * step2
    (reference * weight).sum().backward()
    assert torch.allclose(x.grad, x2.grad) and torch.allclose(step.grad, step2.grad, atol=1e-4)


def test_keep_mask_is_zero_or_one_at_the_asked_rate():
    like = torch.empty(10_001)
    for keep in (0.5, 0.8):
        mask = keep_mask(like, keep)
        assert mask.shape == like.shape and bool(((mask == 0) | (mask == 1)).all())
        assert abs(float(mask.mean()) - keep) < 0.03


def test_lp_grid_of_an_unsigned_tensor_is_genies_unsigned_grid():
    """Non-negative values on a symmetric unsigned grid: codes 0..15 times the step."""
    x = torch.linspace(0, 3, 301)
    step, zero_point = lp_grid(x, 4, per_channel=False, symmetric=True, signed=False)
    assert float(zero_point) == 8.0  # zsq's signed codes -8..7 are Genie's 0..15
    out = learned_step_quantize(x, step, zero_point, 4)
    assert float(out.min()) == 0.0 and float(out.max()) <= 15 * float(step) + 1e-6
    assert 3 * 0.8 / 15 <= float(step) <= 3 / 15 + 1e-6  # a clip ratio of 0.8 to 1


def test_regularizer_alone_drives_every_soft_rounding_to_zero_or_one():
    layer = quantize_model(nn.Sequential(nn.Linear(16, 8)), QuantSpec(wbits=4, abits=None))[0]
    rounding = SoftRounding(layer)
    rounding.soft = True
    optimizer = torch.optim.Adam([rounding.logits], lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        rounding.regularizer(2.0).backward()
        optimizer.step()
    h = rectified_sigmoid(rounding.logits)
    assert bool(((h == 0) | (h == 1)).all())
    hard = rounding.codes()
    rounding.soft = False
    assert torch.equal(hard, rounding.codes())  # soft and hard rounding agree once decided


def test_qdrop_with_probability_zero_is_brecq():
    x, xq = torch.randn(64, 8), torch.randn(64, 8)
    assert torch.equal(mixed_inputs(x, xq, 0.0), xq)  # BRECQ: always the quantized input
    assert torch.equal(mixed_inputs(x, xq, 1.0), x)
    mixed = mixed_inputs(x, xq, 0.5)
    assert (
        bool(((mixed == x) | (mixed == xq)).all())
        and 0.3 < float((mixed == x).float().mean()) < 0.7
    )
    step = LearnedStep(4, drop_prob=0.0)
    step.training = True
    y = torch.randn(1000)
    assert torch.equal(step(y), learned_step_quantize(y, step.step, step.zero_point, 4))


def test_reconstruction_error_sums_features_and_averages_the_rest():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert float(reconstruction_error(a, b)) == 3.0  # sum over 3 channels, mean elsewhere
    tokens_a, tokens_b = torch.zeros(2, 5, 7), torch.ones(2, 5, 7)
    assert float(reconstruction_error(tokens_a, tokens_b)) == 7.0  # sum over features


def test_genie_d_std_mean_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # column means 2, 4; unbiased stds sqrt 2, sqrt 8
    std, mean = std_mean(x, [0])
    assert torch.allclose(mean, torch.tensor([2.0, 4.0]))
    assert torch.allclose(std, torch.tensor([2.0, 8.0]).sqrt())


@pytest.mark.parametrize("dims", [[0, 2, 3], [2, 3]])  # a BN layer's input, the image prior
def test_genie_d_std_mean_is_torchs_in_value_and_gradient(dims):
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    std, mean = std_mean(ours, dims)
    std_ref, mean_ref = torch.std_mean(theirs, dim=dims)
    assert torch.allclose(std, std_ref) and torch.allclose(mean, mean_ref)
    w_std, w_mean = torch.randn_like(std_ref), torch.randn_like(mean_ref)
    ((w_std * std).sum() + (w_mean * mean).sum()).backward()
    ((w_std * std_ref).sum() + (w_mean * mean_ref).sum()).backward()
    assert torch.allclose(ours.grad, theirs.grad)


def test_swing_at_the_centre_is_the_plain_convolution():
    """Reflect-padded by one and cropped at offset one: the input itself."""
    x = torch.randn(2, 3, 9, 9)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    assert torch.equal(swing(x, 1, 1), x)
    assert torch.equal(conv(swing(x, 1, 1)), conv(x))
    shifted = swing(x, 0, 2)  # one pixel left (x) and down (y): reflected at the borders
    assert torch.equal(shifted[:, :, :-1, 1:], x[:, :, 1:, :-1])


# --- the units ----------------------------------------------------------------------------------
def _kinds(model, extra=()):
    units = find_blocks(model, extra)
    return [type(m).__name__ for _, m in units], [n for n, _ in units]


def test_blocks_of_the_cifar_resnet():
    from zsq.models import create_model

    kinds, names = _kinds(create_model("resnet20"))
    assert kinds == ["Conv2d", *["BasicBlock"] * 9, "Linear"]
    assert names[1] == "layer1.0" and names[-1] == "linear"


@pytest.mark.parametrize(
    ("name", "block", "count", "layers"),
    [("resnet18", "BasicBlock", 8, 2), ("mobilenet_v2", "InvertedResidual", 17, 3)],
)
def test_blocks_of_torchvision_models(name, block, count, layers):
    from zsq.models import create_model

    kinds, _ = _kinds(create_model(name, num_classes=10))
    assert kinds.count(block) == count
    assert len(kinds) - count == layers  # the stem conv, (MobileNet's last conv,) the classifier


def test_blocks_of_a_timm_vit_and_of_a_users_module():
    pytest.importorskip("timm")
    from zsq.models import create_model

    kwargs = {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}
    vit = create_model("timm:vit_tiny_patch16_224", num_classes=10, model_kwargs=kwargs)
    kinds, _ = _kinds(vit)
    assert kinds.count("Block") == 2 and kinds[0] == "Conv2d" and kinds[-1] == "Linear"

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return x + self.norm(self.conv(x))

    mine = nn.Sequential(nn.Conv2d(3, 4, 3), Stage(), Stage(), nn.Flatten(), nn.LazyLinear(2))
    assert _kinds(mine)[0] == ["Conv2d", "Conv2d", "Conv2d", "LazyLinear"]
    assert _kinds(mine, ["Stage"])[0] == ["Conv2d", "Stage", "Stage", "LazyLinear"]


# --- the method ---------------------------------------------------------------------------------
def test_the_paper_convention_keeps_first_and_last_layers_at_8_bits():
    teacher = tiny_teacher()
    spec = genie_spec(zsq.Genie(convention="paper"), QuantSpec(wbits=2, abits=4), teacher)
    student = quantize_model(teacher, spec, (3, 8, 8))
    widths = [layer.wbits for _, layer in quant_layers(student)]
    assert widths == [8, 2, 8]
    acts = [q.bits for _, q in act_quantizers(student)]
    assert acts == [8, 8]  # the two ReLUs: the first and the last quantized activation
    inputs = genie_spec(zsq.Genie(), QuantSpec(wbits=2, abits=4, act_placement="input"), teacher)
    student = quantize_model(teacher, inputs)
    inputs_bits = [None if layer.act_quant is None else layer.act_quant.bits
                   for _, layer in quant_layers(student)]  # fmt: skip
    assert inputs_bits == [None, 8, 8]  # the image unquantized
    same = genie_spec(zsq.Genie(convention="all"), QuantSpec(wbits=2, abits=4), teacher)
    assert same == QuantSpec(wbits=2, abits=4)


@pytest.fixture(scope="module")
def reconstructed(tmp_path_factory):
    """A Genie run on the demo's digits CNN (a model zsq builds by name, so that export can
    rebuild the student from the folder), written to a run folder."""
    from zsq.demo import digits_cnn
    from zsq.models import ModelMeta

    folder = tmp_path_factory.mktemp("genie") / "run"
    torch.manual_seed(0)
    teacher = digits_cnn().eval()
    meta = ModelMeta(model="zsq.demo:digits_cnn")
    options = {**SMALL, "image_shape": (1, 8, 8), "meta": meta}
    result = zsq.quantize(teacher, zsq.Genie.smoke(), **options, work_dir=folder, seed=3)
    return teacher, result, folder


def test_the_student_computes_on_its_learned_grids(reconstructed):
    _, result, _ = reconstructed
    for name, layer in quant_layers(result.student):
        if layer.wbits is None:
            continue
        assert layer.w_scale is not None and layer.weight_rounding is None, name
        codes = layer.quantized_weight().codes
        assert torch.equal(codes, codes.round()) and codes.min() >= -(2 ** (layer.wbits - 1))
    for name, quantizer in act_quantizers(result.student):
        if quantizer.bits is not None:
            assert quantizer.has_grid and quantizer.learned is None, name
    blocks = result.report["genie"]["blocks"]
    assert len(blocks) == 4 and all(b["loss_after"] >= 0 for b in blocks)


def test_export_of_a_reconstructed_student_is_bit_exact(reconstructed, tmp_path):
    from zsq.export import load_int
    from zsq.run.export import export_run

    _, result, folder = reconstructed
    report = export_run(folder, "int", tmp_path / "s.safetensors")
    assert report["check"]["passed"] and report["check"]["identical_outputs"]
    reloaded = load_int(tmp_path / "s.safetensors")
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.student.eval()(x))


@pytest.mark.parametrize("unit", [1, 3])  # in the first unit (only the images kept), in the third
def test_a_reconstruction_resumes_after_any_unit_exactly(tmp_path, monkeypatch, unit):
    from zsq.ptq.reconstruct import Reconstruction

    teacher = tiny_teacher()
    zsq.quantize(teacher, zsq.Genie.smoke(), **SMALL, work_dir=tmp_path / "plain")
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, Reconstruction, "_unit", unit)
        with pytest.raises(KeyboardInterrupt):
            zsq.quantize(teacher, zsq.Genie.smoke(), **SMALL, work_dir=tmp_path / "cut")
    assert (tmp_path / "cut.partial" / "checkpoint" / "last.pt").is_file()
    resumed = zsq.quantize(
        teacher, zsq.Genie.smoke(), **SMALL, work_dir=tmp_path / "cut", resume=True
    )
    assert (tmp_path / "cut/student.safetensors").read_bytes() == (
        tmp_path / "plain/student.safetensors"
    ).read_bytes()
    assert len(resumed.report["sessions"]) == 2
    assert [b["unit"] for b in resumed.report["genie"]["blocks"]] == ["0", "3", "8"]


def test_a_distillation_starts_from_the_reconstructed_student_exactly(monkeypatch):
    """--init genie: before its first step the student is the reconstruction's, bit for bit."""
    from zsq.distill import Distiller

    teacher = tiny_teacher()
    genie = zsq.quantize(teacher, zsq.Genie.smoke(), **SMALL, seed=0).student.state_dict()
    started = {}
    fit = Distiller.fit

    def recording(self, *args, **kwargs):
        started.update({k: v.clone() for k, v in self.student.state_dict().items()})
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Distiller, "fit", recording)
    method = zsq.GDFQ(ait=True, recipe="demo", overrides=zsq.GDFQ.smoke().overrides,
                      init=zsq.Genie.smoke())  # fmt: skip
    result = zsq.quantize(teacher, method, **SMALL, seed=0)
    assert set(started) == set(genie)
    for key, value in genie.items():
        assert torch.equal(started[key], value), key
    assert result.report["init"]["method"] == "genie"
    assert json.loads(json.dumps(result.report["init"]))["genie"]["blocks"]


@pytest.mark.parametrize(
    ("stop_in", "call", "units_again"),
    [
        ("train_epoch", 3, 0),  # after an epoch of GI: the start is in the checkpoint
        ("train_epoch", 1, 0),  # the start made, nothing distilled yet: its own checkpoint
        ("_unit", 3, 1),  # in the start's third (last) unit: it goes on with that unit
    ],
)
def test_a_distillation_from_a_reconstructed_student_resumes_exactly(
    tmp_path, monkeypatch, stop_in, call, units_again
):
    """--init genie with AIT, stopped while the start is reconstructed, before the first
    epoch or after an epoch of GI, and resumed: the resumed session makes only the units not
    made yet, counts codes on the reconstruction's grids as the first did, and ends bit for bit
    as an unbroken run."""
    from zsq.distill import Distiller
    from zsq.ptq.reconstruct import Reconstruction

    teacher = tiny_teacher()
    method = zsq.GDFQ(ait=True, recipe="demo", overrides=zsq.GDFQ.smoke().overrides,
                      init=zsq.Genie.smoke())  # fmt: skip
    zsq.quantize(teacher, method, **SMALL, work_dir=tmp_path / "plain")
    owner = Reconstruction if stop_in == "_unit" else Distiller
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, owner, stop_in, call)
        with pytest.raises(KeyboardInterrupt):
            zsq.quantize(teacher, method, **SMALL, work_dir=tmp_path / "cut")
    with monkeypatch.context() as patch:
        units = interrupt_at_call(patch, Reconstruction, "_unit", None)
        resumed = zsq.quantize(teacher, method, **SMALL, work_dir=tmp_path / "cut", resume=True)
    assert len(units) == units_again
    assert (tmp_path / "cut/student.safetensors").read_bytes() == (
        tmp_path / "plain/student.safetensors"
    ).read_bytes()
    assert [b["unit"] for b in resumed.report["init"]["genie"]["blocks"]] == ["0", "3", "8"]


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"recipe": "fast"}, "unknown recipe 'fast' for method genie"),
        ({"convention": "8bit"}, "convention must be one of paper, all"),
        ({"overrides": {"iterations": 5}}, "reconstruction field.* in overrides: iterations"),
        ({"overrides": {"drop_prob": 2}}, "drop_prob takes a number in \\[0, 1\\]"),
        ({"overrides": {"beta_end": 30}}, "beta_end=30 is above beta_start=20.0; .* anneals"),
        ({"calib_options": {"itres": 5}}, "does not take option"),
        # wrong types: one line naming the field, not a TypeError from inside the check
        ({"recipe": ["short"]}, "unknown recipe \\['short'\\]"),
        ({"convention": ["all"]}, "convention must be one of"),
        ({"blocks": None}, "blocks must be a list of class names, got None"),
        ({"blocks": "BasicBlock"}, "blocks must be a list of class names"),
        ({"overrides": 5}, "overrides must be a dict"),
        ({"overrides": "iters"}, "overrides must be a dict"),  # not split into letters
        ({"calib_options": None}, "calib_options must be a dict"),
        ({"calib_options": 5}, "calib_options must be a dict"),
        ({"calib": "geni"}, "calib 'geni' is neither a sample source \\(.*genie"),
        # the count is calib_size's; progress follows the run
        ({"calib_options": {"num_images": 5}}, "num_images is set by calib_size"),
        ({"calib_options": {"progress": False}}, "progress is set by the run"),
        ({"calib_options": {"cache": "."}}, "cache takes a file path \\(not a folder\\)"),
        # no whole batch to reconstruct on (the optimisation would never take a step)
        ({"calib_size": 16, "recipe": "short"}, "calib_size 16 is fewer images than .* of 32"),
        ({"calib_size": 64, "overrides": {"batch_size": 128}}, "calib_size 64 is fewer"),
    ],
)
def test_bad_options_are_one_line_errors(fields, match):
    with pytest.raises(zsq.ZsqError, match=match) as info:
        zsq.Genie(**fields)
    assert "\n" not in str(info.value)


def test_fewer_images_than_a_batch_is_an_error_not_an_endless_loop():
    """Real calibration data can hold fewer images than asked: the reconstruction refuses
    before it starts (it steps on whole batches only, so it would never take one)."""
    from zsq.ptq.reconstruct import Reconstruction

    teacher = tiny_teacher()
    student = quantize_model(teacher, QuantSpec(wbits=4, abits=4), (3, 8, 8))
    config = ReconstructionConfig(iters=5, batch_size=8)
    with pytest.raises(zsq.ZsqError, match="batches of 8 images but has 7 calibration images"):
        Reconstruction(teacher, student, torch.rand(7, 3, 8, 8), config, device=torch.device("cpu"))
    Reconstruction(teacher, student, torch.rand(8, 3, 8, 8), config, device=torch.device("cpu"))


def test_a_checkpoint_of_another_student_is_refused_in_one_line(tmp_path):
    """A reconstruction checkpoint that passes its digest but holds another model's tensors
    (or is no torch file) is a one-line error, not a traceback from load_state_dict."""
    import io

    from zsq.io import write_verified
    from zsq.methods.genie import _resume

    student = quantize_model(tiny_teacher(), QuantSpec(wbits=4, abits=4), (3, 8, 8))
    path = tmp_path / "last.pt"
    buffer = io.BytesIO()
    torch.save({"genie_units_done": 1, "student": {"foo.weight": torch.zeros(1)}}, buffer)
    for payload in (buffer.getvalue(), b"not a torch file"):
        write_verified(path, payload)
        with pytest.raises(zsq.ZsqError, match="not a reconstruction checkpoint of this") as info:
            _resume(path, student)
        assert "\n" not in str(info.value)


def test_a_bit_allocation_needs_the_all_convention():
    teacher = tiny_teacher()
    mixed = zsq.MixedConfig(budget="wbits=4", source="gaussian", samples=8)
    with pytest.raises(zsq.ZsqError, match="convention 'paper' keeps the first and last"):
        zsq.quantize(teacher, zsq.Genie.smoke(), **SMALL, mixed=mixed)


def test_reconstruction_config_defaults_are_the_references():
    config = ReconstructionConfig()
    assert (config.iters, config.batch_size, config.drop_prob) == (20000, 32, 0.5)
    assert (config.lr_weight_step, config.lr_act_step, config.lr_rounding) == (1e-4, 4e-5, 1e-3)
    assert (config.warmup, config.beta_start, config.beta_end) == (0.2, 20.0, 2.0)


def test_a_real_block_reconstructs_below_round_to_nearest(shared_data):
    """On the CIFAR-10-JPEG ResNet-20 at W4A4: every residual block's error after
    reconstruction is below its error at the initial grid with nearest rounding."""
    from zsq.data import load_dataset_for
    from zsq.models import load_teacher
    from zsq.ptq.reconstruct import Reconstruction

    teacher, meta = load_teacher("resnet20", shared_data / "weights/resnet20_cifar10jpeg.pt")
    info = {"image_shape": [3, 32, 32], "num_classes": 10, "normalize_mean": meta.normalize_mean,
            "normalize_std": meta.normalize_std}  # fmt: skip
    data = load_dataset_for(f"cifar10-jpeg:{shared_data / 'cifar10-jpeg'}", info, limit=64)
    images = torch.stack([data[i][0] for i in range(64)])
    student = quantize_model(teacher, QuantSpec(wbits=4, abits=4), (3, 32, 32))
    torch.manual_seed(0)
    config = ReconstructionConfig(iters=100, batch_size=16)
    records = Reconstruction(teacher, student, images, config, device=torch.device("cpu"),
                             progress=False).run()  # fmt: skip
    blocks = [r for r in records if r["kind"] == "BasicBlock"]
    assert len(blocks) == 9
    assert all(r["loss_after"] < r["loss_before"] for r in blocks), blocks


def test_the_cli_sets_genies_fields_and_its_init_by_name(tmp_path, capsys):
    """``--convention``, ``--block``, ``--set`` (reconstruction fields) and, with ``--init
    genie``, ``--init-opt``: each lands in the run's record; a bad one names its flag."""
    from safetensors.torch import save_file

    from zsq.cli import main
    from zsq.demo import digits_cnn

    torch.manual_seed(0)
    save_file(digits_cnn().eval().state_dict(), tmp_path / "cnn.safetensors")
    sidecar = {"model": "zsq.demo:digits_cnn", "in_channels": 1, "image_size": 8}
    (tmp_path / "cnn.json").write_text(json.dumps(sidecar))
    teacher = ["--weights", str(tmp_path / "cnn.safetensors"), "--quiet", "--json"]
    small = ["--calib-size", "8", "--calib-opt", "iters=2", "--calib-opt", "batch_size=4"]
    argv = [*teacher, "--method", "genie", "--recipe", "short", "--convention", "all", *small]
    argv += ["--set", "iters=4", "--set", "batch_size=4", "--block", "Sequential"]
    assert main(["quantize", *argv, "--out", str(tmp_path / "g")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["genie"]["convention"], report["genie"]["units"]) == ("all", "1 Sequential")
    assert report["genie"]["reconstruction"]["iters"] == 4
    assert report["calibration_report"]["iters"] == 2
    # a reconstruction field is an --init-opt of its own (it goes to the start's overrides)
    init = ["--init", "genie", "--init-opt", "recipe=short", "--init-opt", "iters=3",
            "--init-opt", "batch_size=4", "--convention", "all", *small]  # fmt: skip
    gdfq = ["--method", "gdfq", "--ait", "--recipe", "demo"]
    for name, value in zsq.GDFQ.smoke().overrides.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else value
        gdfq += ["--set", f"{name}={text}"]
    assert main(["quantize", *teacher, *gdfq, *init, "--out", str(tmp_path / "a")]) == 0
    init = json.loads(capsys.readouterr().out)["init"]
    assert (init["method"], init["genie"]["convention"]) == ("genie", "all")
    assert init["genie"]["reconstruction"]["iters"] == 3
    bad = [*teacher, "--method", "genie", "--set", "iterations=4", "--out", str(tmp_path / "b")]
    assert main(["quantize", *bad]) == 2
    assert "unknown reconstruction field(s) in --set: iterations" in capsys.readouterr().err
    bad = [*teacher, "--method", "genie", "--block", "Blok", "--out", str(tmp_path / "b")]
    assert main(["quantize", *bad]) == 2
    assert "--block Blok: no module of that class in the model" in capsys.readouterr().err
    alone = [*teacher, "--init-opt", "recipe=short", "--out", str(tmp_path / "c")]
    assert main(["quantize", *alone]) == 2
    assert "--init-opt sets a field of the --init method" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "bc")
