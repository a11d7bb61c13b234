"""The benchmark scripts run from a bare copy of the checkout, as on the GPU machine: valid bash,
their outputs under RUNS (never OUT, the device tool's own folder), and zsq callable without an
installed command."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_each_script_is_valid_bash_sets_up_its_environment_and_leaves_out_alone(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if script.name == "_env.sh":
        return
    code = [line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert 'source "$(dirname "$0")/_env.sh"' in code
    assert not any(re.search(r"\bOUT\b", line) for line in code)


def test_zsq_runs_from_the_checkout_without_an_installed_command(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "-c", "source benchmarks/_env.sh && zsq quantize --help"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: zsq quantize")
