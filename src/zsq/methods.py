"""The quantization methods zsq knows, one list for the CLI and the Python API alike.

No torch here: the CLI reads these names to build its parser, and ``zsq --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping

from zsq.errors import ZsqError

POST_TRAINING_METHODS = ("minmax", "zeroq", "lapq")  # calibrate ranges/clips, no training
BN_GENERATOR_METHODS = ("gdfq", "qimera", "arc")  # generators trained on BN statistics (CNNs)
VIT_METHODS = ("psaq", "mimiq")  # images synthesised from a ViT's attention, then distilled on
GENERATOR_METHODS = (*BN_GENERATOR_METHODS, *VIT_METHODS)  # distil the student on samples
METHOD_NAMES = (*POST_TRAINING_METHODS, *GENERATOR_METHODS)
DEFAULT_RECIPE = "paper-cifar"  # what a generator method runs when no recipe is named
# recipe fields a method sets before the user's overrides: the ViT methods distil with the
# output KL only (MimiQ's QAT), MimiQ adds its head-wise attention distillation at weight 10
METHOD_RECIPE = {"psaq": {"loss": "kl"}, "mimiq": {"loss": "kl", "attn_distill": 10.0}}
INITS = ("lapq",)  # where a generator method's student can start instead of the float copy
# calibration images when --calib is not given: data-free in every case
DEFAULT_CALIB = {"minmax": "gaussian", "zeroq": "zeroq", "lapq": "zeroq", "init": "zeroq"}


def default_calib(method: str, init: str | None = None) -> str:
    """The calibration source a method uses when none is named (``init``: --init lapq)."""
    return DEFAULT_CALIB["init"] if init else DEFAULT_CALIB.get(method, "gaussian")


def check_init(init: str | None) -> str | None:
    if init is not None and init not in INITS:
        raise ZsqError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    return init


def check_method(method: str) -> str:
    """``method`` if zsq knows it, else a one-line error listing the names."""
    if method not in METHOD_NAMES:
        raise ZsqError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
    return method


def refuse_unused(method: str, given: Mapping[str, bool]) -> None:
    """Refuse options that ``method`` would silently ignore (``given``: option name -> was set).

    An ignored option makes the report describe a run that did not happen, so it is an error.
    """
    unused = [name for name, is_set in given.items() if is_set]
    if not unused:
        return
    names = ", ".join(unused)
    it = "it" if len(unused) == 1 else "them"
    verb = "has" if len(unused) == 1 else "have"
    if method in POST_TRAINING_METHODS:
        generators = ", ".join(GENERATOR_METHODS)
        raise ZsqError(
            f"{names} {verb} no effect with method {method} (post-training, no distillation); "
            f"drop {it} or choose a generator method ({generators})"
        )
    raise ZsqError(
        f"{names} {verb} no effect with method {method} (its activation ranges come from its "
        f"synthetic samples; calibration data only serves --init lapq); drop {it}, add --init "
        "lapq, or use a post-training method (minmax, zeroq, lapq)"
    )
