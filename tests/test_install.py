"""The installed `vidsieve` command works from any folder, as `make run` and users call it.

Every other test imports the repo from its root (pytest puts it first on sys.path), which
hides a package in site-packages that shadows one of ours: transformers 5.25 requires the hub's
`kernels` package, whose name is our kernels/ folder, and the installed command then failed at
import (pyproject.toml pins transformers below 5.25).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_top_level_packages_resolve_to_the_repo_outside_it(tmp_path):
    script = ("import compressors, kernels, server, streaming, vlm; "
              "print('\\n'.join(m.__file__ for m in (compressors, kernels, server, streaming, vlm)))")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name, path in zip(("compressors", "kernels", "server", "streaming", "vlm"), result.stdout.split()):
        assert Path(path).resolve().parent == REPO / name, f"{path} shadows the repo's {name}/"


@pytest.mark.slow
def test_the_console_script_answers_outside_the_repo(tmp_path):
    """`make run`'s command, on one bundled clip, from a folder that is not the repo."""
    command = shutil.which("vidsieve", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.skip("the vidsieve console script is not installed next to this interpreter")
    clip = REPO / "eval" / "samples" / "samples_000000.mp4"
    result = subprocess.run([command, "annotate", str(clip), "--question", "What colour is the circle?",
                             "--out", "answers.jsonl", "--workers", "0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "answers.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok" and record["answer"]
