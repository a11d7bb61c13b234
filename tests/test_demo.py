"""The demo's table, closing line and plot (on a shortened configuration)."""

import re

import pytest

from zsq.demo import run_demo, save_plot


@pytest.fixture(scope="module")
def result():
    return run_demo(seed=0, device="cpu", progress=False, scale=0.15)


def test_the_closing_line_ranks_the_methods_as_the_table_does(result):
    table, label = result.table(), f"W{result.bits[0]}A{result.bits[1]}"
    scores = {}
    for line in table.splitlines():
        match = re.match(rf"(.+? {label})\s+([\d.]+)\s+([-+][\d.]+)\s+([\d.]+)\s+none$", line)
        if match:
            scores[match.group(1).rsplit(" ", 1)[0]] = float(match.group(2))
    assert set(scores) == {"min/max", "GDFQ", "GDFQ+AIT", "Genie"}
    ranked = re.search(r"ranked: (.+?)\. ", result.closing_line()).group(1)
    steps = re.split(r" ([>=]) ", ranked)  # name score, sign, name score, ...
    entries = [(e.rsplit(" ", 1)[0], float(e.rsplit(" ", 1)[1])) for e in steps[::2]]
    assert sorted(n for n, _ in entries) == sorted(scores)
    for (name, shown), sign, (after, _) in zip(entries[:-1], steps[1::2], entries[1:], strict=True):
        assert shown == pytest.approx(scores[name], abs=0.051)
        assert (scores[name] == scores[after]) if sign == "=" else scores[name] > scores[after]
    teacher = result.rows[0].top1
    lost = float(re.search(r"loses ([\d.]+) points", result.closing_line()).group(1))
    assert lost == pytest.approx(teacher - scores["min/max"], abs=0.051)


def test_every_row_says_whether_real_data_was_used(result):
    lines = result.table().splitlines()
    assert lines[4].endswith("trained on the digits train split")  # the teacher
    assert all(line.endswith("  none") for line in lines[5:])


def test_the_plot_is_a_png(result, tmp_path):
    from zsq.analysis.plots import written_by_zsq

    path = save_plot(result, tmp_path / "demo.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written_by_zsq(path)  # so a later demo may replace it


def test_the_demo_replaces_only_its_own_plot(tmp_path, capsys):
    from PIL import Image

    from zsq.cli import main

    Image.new("L", (4, 4)).save(tmp_path / "mine.png")  # a PNG of the user's own
    (tmp_path / "notes.png").write_text("not even a PNG")
    for name in ("mine.png", "notes.png"):
        before = (tmp_path / name).read_bytes()
        assert main(["demo", "--plot", str(tmp_path / name)]) == 2
        assert "is not a PNG zsq wrote" in capsys.readouterr().err
        assert (tmp_path / name).read_bytes() == before


def test_the_demo_checks_the_plot_it_writes_with_a_tilde_path(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from zsq.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    Image.new("L", (4, 4)).save(tmp_path / "mine.png")
    assert main(["demo", "--plot=~/mine.png"]) == 2  # no shell expanded the ~
    assert "is not a PNG zsq wrote" in capsys.readouterr().err


def test_the_demo_refuses_a_plot_folder_that_is_not_there(tmp_path, capsys):
    from zsq.cli import main

    assert main(["demo", "--plot", str(tmp_path / "no" / "demo.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
