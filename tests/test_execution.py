"""Execution options (precision, torch.compile): validated, scoped, and exact where they must be."""

import math

import pytest
import torch

from zsq.demo import digits_cnn
from zsq.distill import Distiller
from zsq.errors import ZsqError
from zsq.execution import Execution, compiled_function
from zsq.quant import QuantSpec, quantize_model
from zsq.quant.quantizer import fake_quantize, qparams_from_range, tensor_minmax
from zsq.recipes import apply_overrides, get_recipe
from zsq.synth import build_source

TINY = {
    "epochs": 2,
    "iters_per_epoch": 2,
    "batch_size": 8,
    "gen_warmup_epochs": 0,
    "act_calib_epochs": 1,
    "gi_warmup_epochs": 1,
    "lr_milestones": (1,),
    "probe_batch_size": 8,
}


def _trainer(execution: Execution, ait: bool = True) -> Distiller:
    torch.manual_seed(0)
    teacher = digits_cnn().eval()
    student = quantize_model(teacher, QuantSpec(wbits=4, abits=4), (1, 8, 8))
    source = build_source("gdfq", teacher, num_classes=10, image_shape=(1, 8, 8))
    recipe = apply_overrides(get_recipe("demo"), {**TINY, "gi": ait, "loss": "kl"})
    return Distiller(
        teacher,
        student,
        source,
        recipe,
        device=torch.device("cpu"),
        progress=False,
        execution=execution,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"precision": "fp16"}, "precision"), ({"compile": "fast"}, "compile mode")],
)
def test_bad_options_are_one_line_errors(kwargs, match):
    with pytest.raises(ZsqError, match=match):
        Execution(**kwargs)


@pytest.mark.parametrize(("precision", "allowed"), [("fp32", False), ("tf32", True)])
def test_tensor_core_scope_sets_and_restores_tf32(precision, allowed):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with Execution(precision=precision).tensor_core_scope():
        assert torch.backends.cudnn.allow_tf32 is allowed
        assert torch.backends.cuda.matmul.allow_tf32 is allowed
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == saved


def test_bf16_autocasts_teacher_and_generator_but_hands_float32_batches_to_the_student():
    trainer = _trainer(Execution(precision="bf16"))
    seen = []
    hook = trainer.teacher[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.apply_schedule(0)
    batch, terms = trainer.source.step(8)
    assert seen == [torch.bfloat16]  # the generator's images go through the teacher in bf16
    assert batch.images.dtype == torch.float32 and torch.isfinite(terms["gen_loss"])
    student_inputs = []
    first = trainer.layers[0][1]
    handle = first.register_forward_pre_hook(lambda m, args: student_inputs.append(args[0].dtype))
    terms, _, _ = trainer.student_step(batch)
    hook.remove(), handle.remove()
    assert student_inputs == [torch.float32]  # fake quantization never runs in bf16
    assert seen[-1] == torch.bfloat16 and terms["student_kl"].dtype == torch.float32
    trainer.close()  # gives the source back its plain (fp32) forwards
    hook = trainer.teacher[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.source.step(8)
    hook.remove()
    assert seen[-1] == torch.float32


def test_fp32_run_is_unchanged_by_the_execution_plumbing():
    """Default execution must reproduce a run without it bit for bit."""
    a, b = _trainer(Execution()), _trainer(Execution(precision="fp32"))
    torch.manual_seed(3)
    a.fit()
    torch.manual_seed(3)
    b.fit()
    for p, q in zip(a.student.parameters(), b.student.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_compiled_fake_quantization_is_bit_exact():
    """Inductor must not change a single code (no FMA contraction or reciprocal tricks)."""

    def per_channel(x):
        lo, hi = tensor_minmax(x, 0)
        scale, zero_point = qparams_from_range(lo, hi, 4)
        return fake_quantize(x, scale, zero_point, 4)

    torch.manual_seed(0)
    x = torch.randn(64, 576) * 0.1
    assert torch.equal(compiled_function(per_channel)(x), per_channel(x))


@pytest.mark.slow
def test_compiled_training_runs_close_to_eager_and_close_restores_eager():
    eager, compiled = _trainer(Execution()), _trainer(Execution(compile="default"))
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for trainer in (eager, compiled):
        trainer.apply_schedule(0)
        with torch.no_grad():
            trainer.student(x)  # observe the same activation ranges
        trainer.apply_schedule(1)  # ranges frozen
    with torch.no_grad():
        logits_e, logits_c = eager.student(x), compiled.student(x)
    # the same quantized network up to convolution rounding (an activation code may flip)
    assert torch.equal(logits_c.argmax(1), logits_e.argmax(1))
    torch.testing.assert_close(logits_c, logits_e, rtol=0, atol=1e-2 * logits_e.abs().max().item())
    batch, terms = compiled.source.step(8)
    terms, _, kappa = compiled.student_step(batch)
    assert torch.isfinite(terms["student_kl"]) and (kappa >= 1).all()
    compiled.close()
    assert all(m._compiled_call_impl is None for m in (compiled.teacher, compiled.student))


def _steady_trainer(execution: Execution, device: str) -> Distiller:
    """A trainer on ``device`` past its first epoch (activation ranges observed, then frozen;
    GI active), as the loop is in most of a run."""
    trainer = _trainer(execution)
    trainer.teacher.to(device), trainer.student.to(device), trainer.source.to(device)
    trainer.device = torch.device(device)
    trainer.source.forward_precision = lambda: execution.autocast(trainer.device)
    trainer.apply_schedule(0)
    _iteration(trainer)
    trainer.apply_schedule(1)
    return trainer


def _iteration(trainer: Distiller):
    """The loop body of ``Distiller.train_epoch``: a graph step, a source step, a student step."""
    trainer.execution.begin_step()
    batch, _ = trainer.source.step(8)
    return trainer.student_step(batch)


def test_steady_state_iterations_run_on_cpu():
    """The sequence the CUDA tests below drive, here on the CPU."""
    trainer = _steady_trainer(Execution(), "cpu")
    for _ in range(2):
        terms, fraction, kappa = _iteration(trainer)
    assert torch.isfinite(terms["student_kl"]) and (kappa >= 1).all() and fraction.shape == (4,)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_iteration_makes_no_host_sync_on_cuda(precision):
    """The loop body (source step + student step with GI) never waits for the GPU."""
    trainer = _steady_trainer(Execution(precision=precision), "cuda")
    for _ in range(2):  # lazy optimiser state, cached search constants
        _iteration(trainer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms, fraction, kappa = _iteration(trainer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert terms["student_kl"].is_cuda and kappa.is_cuda and fraction.is_cuda


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_graphs_training_runs_and_keeps_its_epoch_totals():
    """Under CUDA graphs the loop's outputs survive their iteration where they must: a whole
    fit (epoch totals, the probe batch, kappas) runs, with finite metrics."""
    trainer = _trainer(Execution(precision="tf32", compile="reduce-overhead"))
    trainer.teacher.cuda(), trainer.student.cuda(), trainer.source.cuda()
    trainer.device = torch.device("cuda")
    history = trainer.fit()
    last = history[-1]
    assert all(math.isfinite(v) for v in last["kappa"].values())
    assert math.isfinite(last["student_kl"]) and math.isfinite(last["probe_kl"])
    trainer.close()


_HEAP_PROBE = """
import ctypes, json, sys
from zsq.execution import tune_cpu_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = tune_cpu_allocator()
before = libc.mallinfo2().hblks
block = libc.malloc(20 * 2**20)  # a 20 MB tensor's worth
mmapped = libc.mallinfo2().hblks - before
libc.free(block)
print(json.dumps({"applied": applied, "mmapped": mmapped}))
"""


def _probe_heap(**env: str) -> dict:
    import json
    import os
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator tuning is for glibc Linux")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ZSQ_CPU"))}
    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_tuned_allocator_serves_a_20_mb_block_from_the_heap():
    # glibc's default (128 KiB threshold before any free) mmaps a 20 MB block; tuned, the heap
    # serves it, so freeing and reallocating it costs no page faults.
    assert _probe_heap() == {"applied": True, "mmapped": 0}
    assert _probe_heap(ZSQ_CPU_ALLOCATOR="system") == {"applied": False, "mmapped": 1}
    assert _probe_heap(MALLOC_TRIM_THRESHOLD_="131072") == {"applied": False, "mmapped": 1}
