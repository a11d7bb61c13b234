"""Every file name of a run folder, its checkpoint and its exports, in one place.

A run, a method, an export or an analysis that writes or reads a run folder asks a
:class:`RunLayout` for the path; nothing else spells these names. Pure path logic (no torch), so
every layer of zsq can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PARTIAL_SUFFIX = ".partial"  # a run in progress writes into OUT.partial, renamed to OUT at the end
DIGEST_SUFFIX = ".sha256"  # a verified file's sha256 beside it (sha256sum style)
EXPORT_FILES = {"int": "student.int.safetensors", "onnx": "student.onnx"}


@dataclass(frozen=True)
class RunLayout:
    """The files of the run folder ``folder`` (a finished ``OUT`` or a working ``OUT.partial``)."""

    folder: Path

    MARKER = ".zsq-run"  # the run record: options that define the run, seconds per session
    STUDENT = "student.safetensors"
    QUANT = "quant.json"
    REPORT = "report.json"
    REPORT_MD = "report.md"
    METRICS = "metrics.jsonl"  # per-epoch measurements of a distillation
    CHECKPOINT_DIR = "checkpoint"
    CHECKPOINT = "last.pt"
    IMAGE_BATCHES = "images.pt"  # in CHECKPOINT_DIR: a pool's batches made so far (Genie-D)
    BITS = "bits.json"  # a mixed-precision allocation
    ALLOCATION_DIR = "allocation"  # the allocator's synthetic images
    CALIBRATION = "calibration.safetensors"  # synthetic calibration images, kept for a resume
    GENERATOR = "generator.safetensors"  # a trained sample source's state, kept for analysis
    POOL = "synthetic.safetensors"  # a pool source's images (ViT methods), kept for a resume
    ANALYSIS_DIR = "analysis"  # where `zsq analyze` writes by default
    ANALYSIS_FILES = {  # what each `zsq analyze` mode writes into its folder
        "run": ("crossings.png", "layers_no_change.png", "probe_kl.png", "grad_cosines.png",
                "run.json"),
        "hessian": ("hessian_density.png", "hessian_surface.png", "hessian_trace.png",
                    "hessian.json"),
        "compare": ("compare_probe_kl.png", "compare_layers_no_change.png",
                    "compare_mean_crossing.png", "compare_grad_cosines.png", "compare.json"),
    }  # fmt: skip
    # What zsq writes into a run folder, as glob patterns: the run itself, and the exports and
    # analyses whose default place it is. Anything else there is the user's.
    COMMON_ENTRIES = (
        MARKER,
        CHECKPOINT_DIR,
        "student.*",
        REPORT,
        REPORT_MD,
        QUANT,
        METRICS,
        BITS,
        ALLOCATION_DIR,
        "init_*.json",
        ".*.tmp",  # a write or an export cut short (atomic writes go through such names)
        CALIBRATION,
        GENERATOR,
        POOL,
        ANALYSIS_DIR,
    )
    # the files a finished run's student is rebuilt from (export, analysis)
    STUDENT_FILES = (MARKER, REPORT, STUDENT)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))

    def __truediv__(self, name: str) -> Path:
        return self.folder / name

    @property
    def marker(self) -> Path:
        return self.folder / self.MARKER

    @property
    def student(self) -> Path:
        return self.folder / self.STUDENT

    @property
    def quant(self) -> Path:
        return self.folder / self.QUANT

    @property
    def report(self) -> Path:
        return self.folder / self.REPORT

    @property
    def report_md(self) -> Path:
        return self.folder / self.REPORT_MD

    @property
    def metrics(self) -> Path:
        return self.folder / self.METRICS

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder / self.CHECKPOINT_DIR

    @property
    def checkpoint(self) -> Path:
        return self.checkpoint_dir / self.CHECKPOINT

    @property
    def image_batches(self) -> Path:
        return self.checkpoint_dir / self.IMAGE_BATCHES

    @property
    def bits(self) -> Path:
        return self.folder / self.BITS

    @property
    def allocation_dir(self) -> Path:
        return self.folder / self.ALLOCATION_DIR

    @property
    def calibration(self) -> Path:
        return self.folder / self.CALIBRATION

    @property
    def generator(self) -> Path:
        return self.folder / self.GENERATOR

    @property
    def pool(self) -> Path:
        return self.folder / self.POOL

    @property
    def analysis_dir(self) -> Path:
        return self.folder / self.ANALYSIS_DIR

    def init_report(self, method: str) -> Path:
        """What the method a distillation started from (``init``) reported."""
        return self.folder / f"init_{method}.json"

    def init_checkpoint(self, method: str) -> Path:
        """The checkpoint of a distillation's start made by ``method`` (``init``) while it is
        made: beside the distillation's own, which takes over after its first epoch."""
        return self.checkpoint_dir / f"init_{method}.pt"

    def checkpoint_is_marker(self) -> bool:
        """Whether the checkpoint is only the marker that keeps the run resumable (its images
        are kept) before the method has a state of its own; see :func:`is_resume_marker`."""
        with open(self.checkpoint, "rb") as file:
            return is_resume_marker(file.read(1))

    def export(self, fmt: str) -> Path:
        """Where ``zsq export --format fmt`` writes by default."""
        return self.folder / EXPORT_FILES[fmt]


def is_resume_marker(payload: bytes) -> bool:
    """Whether checkpoint bytes are the resume marker (a JSON record, written when a run keeps
    its calibration images) rather than a method's state (a torch file)."""
    return payload[:1] == b"{"


def digest_file(path: Path) -> Path:
    """The sha256 file written beside a verified file."""
    return path.with_name(path.name + DIGEST_SUFFIX)


def manifest_file(export: Path) -> Path:
    """The JSON manifest beside an integer export."""
    return export.with_suffix(".json")
