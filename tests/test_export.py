"""Export: packing, the integer round trip, the integer reference, ONNX Q/DQ in onnxruntime."""

import json

import pytest
import torch
from torch import nn

from zsq.cli import main
from zsq.errors import ZsqError
from zsq.export import (
    export_int,
    integer_conv2d,
    integer_linear,
    load_int,
    pack_codes,
    size_report,
    unpack_codes,
)
from zsq.models import create_model
from zsq.ptq import calibrate_activations
from zsq.quant import QuantSpec, act_quantizers, quant_layers, quantize_model
from zsq.quant.modules import ActQuantizer, QuantConv2d, QuantLinear

INFO = {"name": "resnet20", "num_classes": 10, "in_channels": 3, "image_shape": [3, 16, 16]}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("numel", [1, 2, 7, 64, 1001])
def test_packed_codes_unpack_exactly(bits, numel):
    gen = torch.Generator().manual_seed(bits * 1000 + numel)
    for _ in range(5):
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (numel,), generator=gen)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2
        assert torch.equal(unpack_codes(packed, numel), codes.to(torch.int8))


def test_packing_refuses_codes_outside_the_range():
    with pytest.raises(ZsqError):
        pack_codes(torch.tensor([8]), 4)


def student(spec: QuantSpec, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("resnet20").eval()
    s = quantize_model(model, spec, (3, 16, 16))
    calibrate_activations(s, [torch.randn(16, 3, 16, 16)])
    return s.eval()


SPECS = {
    "w4a4 reference": QuantSpec(wbits=4, abits=4),
    "w8a8 reference": QuantSpec(wbits=8, abits=8),
    "w2a3 input placement": QuantSpec(wbits=2, abits=3, act_placement="input"),
    "w5a6 per-tensor symmetric": QuantSpec(wbits=5, abits=6, per_channel=False, w_symmetric=True),
    "w4 with fp layers": QuantSpec(wbits=4, abits=4, overrides={"linear": {"wbits": None}}),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_integer_export_reloads_to_bit_identical_outputs(name, tmp_path):
    original = student(SPECS[name])
    info = {**INFO, "act_placement": SPECS[name].act_placement}
    manifest = export_int(original, tmp_path / "s.safetensors", info)
    assert manifest["format"] == "zsq-int" and (tmp_path / "s.json").is_file()
    reloaded = load_int(tmp_path / "s.safetensors")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(x), original(x))


def test_lapq_students_export_their_fixed_ranges_and_offsets(tmp_path):
    from zsq.ptq import CalibrationSet, LapqConfig, lapq_quantize

    torch.manual_seed(0)
    teacher = create_model("resnet20").eval()
    data = CalibrationSet(torch.randn(8, 3, 16, 16), None, "noise", real=False)
    config = LapqConfig(stages="lw", max_samples=4096)
    lapq, _ = lapq_quantize(teacher, QuantSpec(wbits=3, abits=4), data, config, progress=False)
    manifest = export_int(lapq, tmp_path / "l.safetensors", {**INFO, "act_placement": "reference"})
    entry = manifest["layers"]["layer1.0.conv1"]
    assert entry["fixed_range"] and entry["has_offset"] and entry["packed"]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_int(tmp_path / "l.safetensors")(x), lapq(x))


def test_an_edited_or_truncated_manifest_is_refused(tmp_path):
    export_int(
        student(SPECS["w4a4 reference"]),
        tmp_path / "s.safetensors",
        {**INFO, "act_placement": "reference"},
    )
    manifest = tmp_path / "s.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"wbits": 4', '"wbits": 3', 1))
    with pytest.raises(ZsqError, match="edited or truncated"):
        load_int(tmp_path / "s.safetensors")
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(ZsqError, match="edited or truncated"):
        load_int(tmp_path / "s.safetensors")


def quantized_input_layer(layer, bits=4, seed=0):
    torch.manual_seed(seed)
    aq = ActQuantizer(bits, observer="minmax")
    return aq


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("offset", [False, True])
def test_the_integer_reference_equals_the_fake_quant_conv(groups, offset):
    torch.manual_seed(groups)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups)
    aq = ActQuantizer(4, observer="minmax")
    layer = QuantConv2d.from_float(conv, 3, act_quant=aq)
    x = torch.randn(2, 4, 9, 9) * 2
    layer(x)  # observe the input range
    aq.observing = False
    if offset:
        layer.set_weight_offset(torch.randn(6) * 0.01)
    with torch.no_grad():
        assert torch.allclose(integer_conv2d(layer, x, aq), layer(x), atol=1e-5, rtol=1e-5)


def test_the_integer_reference_equals_the_fake_quant_linear():
    torch.manual_seed(3)
    aq = ActQuantizer(5, observer="minmax")
    layer = QuantLinear.from_float(nn.Linear(12, 5), 4, act_quant=aq)
    x = torch.randn(7, 12)
    layer(x)
    aq.observing = False
    layer.set_weight_offset(torch.randn(5) * 0.01)
    with torch.no_grad():
        assert torch.allclose(integer_linear(layer, x, aq), layer(x), atol=1e-5, rtol=1e-5)


def test_size_report_counts_packed_codes_at_half_a_byte():
    s = student(SPECS["w4a4 reference"])
    sizes = size_report(s)
    conv = sizes["layers"]["layer1.0.conv1"]
    assert conv["fp32"] == 2304 * 4 and conv["packed"] == 1152 + 16 * 14
    assert conv["int8"] == 2304 + 16 * 14
    assert sizes["total"]["fp32"] > sizes["total"]["int8"] > sizes["total"]["packed"]


def test_onnx_without_the_extra_names_it(run_dir, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )
    assert main(["export", str(run_dir), "--format", "onnx", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'zsq[onnx]'" in err and "\n" not in err
    assert not (run_dir / "student.onnx").exists()


onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from zsq.export.onnx import onnxruntime_session  # noqa: E402  (needs the onnx extra)


@pytest.mark.parametrize("name", ["w4a4 reference", "w2a3 input placement", "w8a8 reference"])
def test_onnx_has_qdq_on_every_quantized_tensor_and_runs_in_onnxruntime(name, tmp_path):
    from zsq.export import export_onnx

    s = student(SPECS[name])
    path = export_onnx(s, tmp_path / "s.onnx", (3, 16, 16), {"num_classes": 10})
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    n_acts = sum(aq.bits is not None for _, aq in act_quantizers(s))
    n_weights = sum(layer.wbits is not None for _, layer in quant_layers(s))
    assert ops.count("QuantizeLinear") == n_acts
    assert ops.count("DequantizeLinear") == n_acts + n_weights
    integer = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    dq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert len(integer & dq_inputs) == n_weights  # every quantized weight is stored as codes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": torch.randn(5, 3, 16, 16).numpy()})[0]
    assert got.shape == (5, 10)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_onnx_qdq_equals_the_quantizer_except_at_exact_ties(bits, tmp_path):
    """ONNX divides by 1/S where Eq. 1 multiplies by S (and multiplies by 1/S where Eq. 4
    divides): codes differ only where S*x lands within float rounding of a half-integer, by one
    step; values otherwise by float rounding."""
    from zsq.export import export_onnx

    aq = ActQuantizer(bits, observer="minmax")
    x = torch.randn(20000) * 3 + 0.5
    aq(x)
    aq.observing = False
    layer = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
    s = quantize_model(layer, QuantSpec(wbits=8, abits=bits, act_placement="input"))
    s[1].act_quant = aq
    # read the dequantized input back through an identity weight: compare the Q/DQ node itself
    with torch.no_grad():
        s[1].weight.copy_(torch.eye(4))
        s[1].bias.zero_()
    path = export_onnx(s, tmp_path / "q.onnx", (1, 2, 2))
    # the graph's own arithmetic (as the export check): onnxruntime 1.32's default level fuses
    # 8-bit Q/DQ around Gemm into an integer kernel whose codes differ by up to 87 steps here
    session = onnxruntime_session(path)
    inputs = x.reshape(-1, 1, 2, 2)
    got = torch.from_numpy(session.run(None, {"input": inputs.numpy()})[0]).reshape(-1)
    with torch.no_grad():
        expected = aq(x)
    step = 1.0 / float(aq.qparams()[0])
    steps = ((got - expected) / step).round()  # codes apart; the rest is float rounding
    assert steps.abs().max() <= 1 and (steps != 0).float().mean() < 1e-3
    assert torch.allclose(got - steps * step, expected, rtol=1e-6, atol=1e-6)


def test_onnx_matches_a_trained_student(shared_data, tmp_path):
    from zsq.export import export_onnx
    from zsq.models import load_teacher

    teacher, _ = load_teacher("resnet20", str(shared_data / "weights/resnet20_cifar10jpeg.pt"))
    s = quantize_model(teacher.eval(), QuantSpec(wbits=4, abits=4), (3, 32, 32))
    calibrate_activations(
        s, [torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    )
    s.eval()
    path = export_onnx(s, tmp_path / "r.onnx", (3, 32, 32))
    session = onnxruntime_session(path)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        expected = s(x)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert (got - expected).abs().max() < 1e-3


class TokenLinears(nn.Module):
    """Linear layers over (batch, tokens, features), as in a ViT: ONNX ``MatMul``, not ``Gemm``."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.head = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2)  # (N, 3, 8, 8) -> 3 tokens of 64 features
        return self.head(self.down(torch.relu(self.up(tokens))).mean(1))


def test_onnx_check_and_eval_measure_the_graph_not_onnxruntime_fusions(tmp_path):
    """Weight-only 4-bit Linears: onnxruntime's default optimisation rewrites their
    DequantizeLinear -> MatMul into MatMulNBits, which computes differently; the export check and
    eval-export keep ORT_ENABLE_BASIC, where the graph matches the student to float rounding."""
    from zsq.export import export_onnx
    from zsq.export.onnx import OnnxRuntimeModel
    from zsq.export.verify import verify_export

    torch.manual_seed(0)
    s = quantize_model(TokenLinears().eval(), QuantSpec(wbits=4, abits=None)).eval()
    path = export_onnx(s, tmp_path / "w4.onnx", (3, 8, 8))
    assert verify_export(s, path, "onnx", (3, 8, 8))["max_abs_diff"] < 1e-4
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = s(x)
    assert (OnnxRuntimeModel(path)(x) - expected).abs().max() < 1e-4  # zsq eval-export's model

    options = ort.SessionOptions()  # the reason: onnxruntime's default level
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert "MatMulNBits" in ops and (fused - expected).abs().max() > 1e-4


# --- the CLI -----------------------------------------------------------------------------------
@pytest.fixture
def run_dir(small_teacher, tmp_path):
    out = tmp_path / "run"
    argv = ["quantize", *small_teacher, "--out", str(out), "--calib-size", "16"]
    assert main([*argv, "--quiet", "--device", "cpu"]) == 0
    return out


def test_cli_exports_both_formats_and_evaluates_them(run_dir, tmp_path, capsys):
    import numpy as np

    for fmt, name in (("int", "s.safetensors"), ("onnx", "s.onnx")):
        code = main(
            [
                "export",
                str(run_dir),
                "--format",
                fmt,
                "--out",
                str(tmp_path / name),
                "--json",
                "--quiet",
            ]
        )
        result = json.loads(capsys.readouterr().out)
        assert code == 0 and result["bytes"] == (tmp_path / name).stat().st_size
        check = result["check"]
        assert check.get("identical_outputs", True) and check.get("argmax_agreement", 1.0) == 1.0
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (20, 8, 8), np.uint8), y=np.arange(20) % 10)
    tops = []
    for name in ("s.safetensors", "s.onnx"):
        code = main(
            [
                "eval-export",
                str(tmp_path / name),
                "--data",
                f"npz:{tmp_path}/d.npz",
                "--json",
                "--quiet",
            ]
        )
        assert code == 0
        out = json.loads(capsys.readouterr().out)
        tops.append(out["top1"])
        assert out["bytes"] == (tmp_path / name).stat().st_size  # size and speed beside top-1
        assert [s["batch"] for s in out["latency"]] == [1, 64]
        assert all(s["ms_per_image"] > 0 and s["repeats"] >= 5 for s in out["latency"])
    assert tops[0] == tops[1]


def _flip_middle(path, block: bytes) -> None:
    """Invert 8 bytes in the middle of ``block``, where it lies in the file ``path``."""
    data = bytearray(path.read_bytes())
    at = data.index(block) + len(block) // 2
    data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", ["int", "onnx"])
def test_an_export_whose_weights_were_damaged_is_refused(fmt, run_dir, tmp_path, capsys):
    """Each export records the sha256 of its tensors (the manifest of an integer export, the
    metadata of an ONNX file); flipped bytes inside a weight leave a file that still parses."""
    path = tmp_path / ("s.safetensors" if fmt == "int" else "s.onnx")
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(path), "--quiet"]) == 0
    capsys.readouterr()
    evaluate = ["eval-export", str(path), "--data", "digits", "--limit", "8", "--quiet", "--json"]
    assert main([*evaluate, "--no-latency"]) == 0
    assert json.loads(capsys.readouterr().out)["latency"] == []  # the opt-out measures nothing
    if fmt == "int":
        from safetensors.torch import load_file

        codes = next(v for k, v in load_file(path).items() if v.numel() >= 64)
        _flip_middle(path, codes.contiguous().view(torch.uint8).numpy().tobytes())
    else:
        import onnx

        weights = max(onnx.load(str(path)).graph.initializer, key=lambda t: len(t.raw_data))
        _flip_middle(path, weights.raw_data)
    assert main(evaluate) == 2
    line = one_error_line(capsys)
    assert "do not match the sha256" in line and "export the run again" in line


@pytest.mark.parametrize(
    "case",
    ["not a quantize folder", "missing --out folder", "edited manifest", "truncated manifest"],
)
def test_cli_export_errors_exit_2_with_one_line(case, run_dir, tmp_path, capsys):
    if case == "not a quantize folder":
        (tmp_path / "other").mkdir()
        argv = ["export", str(tmp_path / "other"), "--format", "int"]
    elif case == "missing --out folder":
        argv = [
            "export",
            str(run_dir),
            "--format",
            "int",
            "--out",
            str(tmp_path / "no/s.safetensors"),
        ]
    else:
        assert main(["export", str(run_dir), "--format", "int", "--quiet"]) == 0
        manifest = run_dir / "student.int.json"
        text = manifest.read_text()
        edited = (
            text.replace('"in_channels": 1', '"in_channels": 3') if "edited" in case else text[:50]
        )
        manifest.write_text(edited)
        argv = ["eval-export", str(run_dir / "student.int.safetensors"), "--data", "digits"]
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zsq: error: ")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# --- what an export may replace, and what it leaves when it fails ------------------------------
def export_argv(run_dir, fmt, out=None, *flags):
    return ["export", str(run_dir), "--format", fmt, *(["--out", str(out)] if out else []), *flags]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zsq: error: ")
    return err[0]


def test_int_export_never_replaces_a_file_unless_told(run_dir, tmp_path, capsys):
    """The manifest X.json beside X.safetensors may be the user's own file."""
    users = tmp_path / "X.json"
    users.write_text("my notes\n")
    target = tmp_path / "X.safetensors"
    assert main([*export_argv(run_dir, "int", target), "--quiet"]) == 2
    assert f"{users} (written with X.safetensors) exists; pass --overwrite" in one_error_line(
        capsys
    )
    assert users.read_text() == "my notes\n" and not target.exists()
    assert main([*export_argv(run_dir, "int", target), "--overwrite", "--quiet"]) == 0
    assert json.loads(users.read_text())["format"] == "zsq-int"
    load_int(target)  # a complete, matching pair


def test_re_exporting_into_the_run_folder_needs_overwrite(run_dir, capsys):
    default, manifest = run_dir / "student.int.safetensors", run_dir / "student.int.json"
    assert main([*export_argv(run_dir, "int"), "--quiet"]) == 0
    first = manifest.read_text()
    default.write_bytes(b"an older export")
    assert main([*export_argv(run_dir, "int"), "--quiet"]) == 2
    assert one_error_line(capsys).endswith(f"{default} exists; pass --overwrite to replace it")
    assert default.read_bytes() == b"an older export"
    assert main([*export_argv(run_dir, "int"), "--overwrite", "--quiet"]) == 0
    assert manifest.read_text() == first
    load_int(default)  # the tensors match the manifest again


def test_onnx_export_never_replaces_a_file_unless_told(run_dir, tmp_path, capsys):
    target = tmp_path / "mine.onnx"
    target.write_text("my model")
    assert main([*export_argv(run_dir, "onnx", target), "--quiet"]) == 2
    assert "mine.onnx exists; pass --overwrite to replace it" in one_error_line(capsys)
    assert target.read_text() == "my model"
    assert main([*export_argv(run_dir, "onnx", target), "--overwrite", "--quiet"]) == 0
    assert onnx.load(str(target)).graph.node
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("name", ["student.safetensors", "report.safetensors"])
def test_an_export_never_replaces_the_run_it_comes_from(name, run_dir, capsys):
    """Not even with --overwrite: report.safetensors would put its manifest on report.json."""
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    argv = [*export_argv(run_dir, "int", run_dir / name), "--overwrite", "--quiet"]
    assert main(argv) == 2
    assert "is a file of the run being exported; choose another --out" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_the_python_api_refuses_existing_files_too(tmp_path):
    s, info = student(SPECS["w4a4 reference"]), {**INFO, "act_placement": "reference"}
    (tmp_path / "s.json").write_text("mine")
    with pytest.raises(ZsqError, match="s.json .* exists; pass overwrite=True"):
        export_int(s, tmp_path / "s.safetensors", info)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]
    export_int(s, tmp_path / "s.safetensors", info, overwrite=True)
    assert (tmp_path / "s.json").read_text() != "mine"
    from zsq.export import export_onnx

    (tmp_path / "s.onnx").write_text("mine")
    with pytest.raises(ZsqError, match="s.onnx exists; pass overwrite=True"):
        export_onnx(s, tmp_path / "s.onnx", (3, 16, 16))
    assert (tmp_path / "s.onnx").read_text() == "mine"


def break_the_check(fmt, monkeypatch):
    """Make the reloaded export differ from the student, as a bug in a writer would."""
    if fmt == "int":
        import zsq.export.verify as verify

        real_load_int = verify.load_int

        def load_shifted(path):
            reloaded = real_load_int(path)
            reloaded.register_forward_hook(lambda module, inputs, output: output + 1)
            return reloaded

        monkeypatch.setattr(verify, "load_int", load_shifted)
    else:
        import numpy as np

        nan_logits = [np.full((16, 10), np.nan, np.float32)]
        monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *args: nan_logits)


@pytest.mark.parametrize("fmt", ["int", "onnx"])
@pytest.mark.parametrize("replacing", [False, True])
def test_a_failed_check_is_an_error_and_writes_nothing(
    fmt, replacing, run_dir, capsys, monkeypatch
):
    names = {"int": ["student.int.safetensors", "student.int.json"], "onnx": ["student.onnx"]}[fmt]
    if replacing:  # an earlier export stays as it was
        for name in names:
            (run_dir / name).write_text("earlier export")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    break_the_check(fmt, monkeypatch)
    flags = ["--overwrite"] if replacing else []
    assert main([*export_argv(run_dir, fmt), *flags, "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "failed its check" in line and "OUTPUTS DIFFER" in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # no temporary either


def student_with_non_finite(run_dir, tmp_path, bad):
    """A copy of the run whose saved student holds NaN/inf in the tensors ``bad`` names, as a
    run whose training diverged writes it (its digest recorded with it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from zsq.io import read_marker, sha256_file, write_marker

    copy = tmp_path / "diverged"
    shutil.copytree(run_dir, copy)
    state = load_file(copy / "student.safetensors")
    for key, value in bad.items():
        state[key] = torch.full_like(state[key], value)
    save_file(state, copy / "student.safetensors")
    record = read_marker(copy)
    record.pop("zsq_run", None)
    record["files"]["student.safetensors"] = sha256_file(copy / "student.safetensors")
    write_marker(copy, record)
    return copy


@pytest.mark.parametrize("fmt", ["int", "onnx"])
def test_a_diverged_student_is_refused_naming_its_first_bad_tensor(fmt, run_dir, tmp_path, capsys):
    from zsq.run.finished import student_from_run

    order = list(student_from_run(run_dir)[0].state_dict())
    weights = [k for k in order if k.endswith(".weight")]
    first, later = weights[1], weights[-1]
    copy = student_with_non_finite(run_dir, tmp_path, {later: float("inf"), first: float("nan")})
    before = sorted(p.name for p in copy.iterdir())
    assert main([*export_argv(copy, fmt), "--quiet"]) == 2
    assert f"the student's {first} holds NaN or inf values" in one_error_line(capsys)
    assert sorted(p.name for p in copy.iterdir()) == before


def test_an_infinite_activation_range_is_refused(run_dir, tmp_path):
    from zsq.run.finished import student_from_run

    s, info = student_from_run(run_dir)
    name, aq = next((n, aq) for n, aq in act_quantizers(s) if aq.bits is not None)
    aq.x_max.fill_(float("inf"))
    with pytest.raises(ZsqError, match=f"student's {name}.x_max holds NaN or inf"):
        export_int(s, tmp_path / "s.safetensors", info)
    assert not any(tmp_path.glob("s.*"))


# --- which run: finished, unfinished, none -----------------------------------------------------
@pytest.mark.parametrize("case", ["resumable", "before its first checkpoint", "no run"])
def test_export_of_a_run_that_is_not_finished_says_so(case, run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck").mkdir()
    if case != "no run":
        run_dir.rename(tmp_path / "ck/orig.partial")
    if case == "resumable":
        (tmp_path / "ck/orig.partial/checkpoint").mkdir()
        (tmp_path / "ck/orig.partial/checkpoint/last.pt").write_bytes(b"")
    assert main(["export", "ck/orig", "--format", "onnx", "--quiet"]) == 2
    line = one_error_line(capsys)
    expected = {
        "resumable": "ck/orig is an unfinished run (ck/orig.partial); finish it with "
        "`zsq quantize ... --resume ck/orig` first",
        "before its first checkpoint": "ck/orig is an unfinished run (ck/orig.partial) that "
        "stopped before its first checkpoint; run `zsq quantize ... --out ck/orig --overwrite`",
        "no run": "no zsq run at ck/orig",
    }[case]
    assert expected in line
    assert not (tmp_path / "ck/orig").exists()


def test_a_damaged_run_is_refused_not_exported(run_dir, tmp_path, capsys):
    """The run records the sha256 of each file it writes; 64 flipped bytes of the student are
    an error, not an export that reports itself bit-identical."""
    student = run_dir / "student.safetensors"
    data = bytearray(student.read_bytes())
    for i in range(len(data) - 64, len(data)):
        data[i] ^= 0xFF
    student.write_bytes(bytes(data))
    out = tmp_path / "s.safetensors"
    assert main(["export", str(run_dir), "--format", "int", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "student.safetensors is not the file the run wrote" in err and err.count("\n") == 1
    assert not out.exists()


def test_a_truncated_student_of_a_run_without_digests_is_a_one_line_error(run_dir, capsys):
    from zsq.io import read_marker, write_marker

    record = read_marker(run_dir)
    record.pop("files")  # as a run written before zsq recorded digests
    record.pop("zsq_run", None)
    write_marker(run_dir, record)
    student = run_dir / "student.safetensors"
    student.write_bytes(student.read_bytes()[:100])
    assert main(["export", str(run_dir), "--format", "int", "--quiet"]) == 2
    assert "student.safetensors is unreadable" in capsys.readouterr().err


def test_a_run_in_a_folder_named_with_non_utf8_bytes_exports_and_evaluates(
    run_dir, tmp_path, capsys
):
    """safetensors and onnxruntime open only UTF-8 paths; zsq reads such files' bytes itself."""
    import os

    folder = run_dir.rename(tmp_path / os.fsdecode(b"run\xff"))
    for fmt, name in (("int", "student.int.safetensors"), ("onnx", "student.onnx")):
        assert main(["export", str(folder), "--format", fmt, "--quiet"]) == 0, capsys.readouterr()
        argv = ["eval-export", str(folder / name), "--data", "digits", "--limit", "8"]
        assert main([*argv, "--no-latency", "--json", "--quiet"]) == 0, capsys.readouterr()
