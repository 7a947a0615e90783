"""Files and folders loramoe writes get the mode the umask gives an ordinary ``open``/``mkdir``, so
another user can read adapters, reports and a shared model cache."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest

from loramoe import models as loramoe_models
from loramoe.fileio import atomic_write_text
from loramoe.plots import pyplot, save_figure


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, mask, expected):
    with umask(mask):
        atomic_write_text(tmp_path / "report.md", "hello")
        with open(tmp_path / "plain.md", "w") as handle:
            handle.write("hello")
    assert mode(tmp_path / "report.md") == expected == mode(tmp_path / "plain.md")


def test_the_converted_model_cache_is_readable_by_others_under_the_usual_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMOE_CACHE", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"x" * 10)
    monkeypatch.setattr(loramoe_models, "_gguf_path", lambda spec: gguf)
    monkeypatch.setattr(loramoe_models, "_convert_gguf",
                        lambda gguf_path, out, name: (out / "config.json").write_text("{}"))
    with umask(0o022):
        folder = loramoe_models.embedded_model_dir("smollm2-135m")
    assert mode(folder) == 0o755 and mode(folder / "config.json") == 0o644


def test_figures_are_saved_with_the_umask_mode_and_closed(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with umask(0o027):
        save_figure(fig, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mode(tmp_path / "plot.png") == 0o640 and not plt.fignum_exists(fig.number)
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temporary left behind
