"""`vidsieve annotate` end to end: real clips, a corrupt file, records, exit codes, resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import main
from tests.video_fixtures import write_video
from vlm.model import VLM, VLMConfig

RECORD_FIELDS = {"id", "video", "sha256", "question", "answer", "status", "error", "model", "compressor",
                 "frames", "visual_tokens", "timings"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    VLM.from_config(VLMConfig.from_name("vidsieve-tiny")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("clips")
    good = [folder / "a.mp4", folder / "b.webm"]
    write_video(good[0], frame_count=12, fps=6)
    write_video(good[1], codec="libvpx-vp9", frame_count=10, fps=5)
    corrupt = folder / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    return [*good, corrupt]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_annotate_writes_one_record_per_video_and_question_and_exits_3_on_a_corrupt_file(model_dir, clips, tmp_path):
    out = tmp_path / "out.jsonl"
    code = main(["annotate", *map(str, clips), "-q", "what colour is the circle?", "-q", "how many objects?",
                 "--out", str(out), "--model", str(model_dir), "--compressor", "avgpool:factor=2",
                 "--num-frames", "4", "--no-progress"])
    assert code == 3
    records = read_records(out)
    assert len(records) == 6
    assert all(RECORD_FIELDS <= set(r) for r in records)
    ok = [r for r in records if r["status"] == "ok"]
    assert {Path(r["video"]).name for r in ok} == {"a.mp4", "b.webm"}
    for record in ok:
        assert record["frames"] == 4
        assert record["visual_tokens"] == {"before": 4 * 16, "after": 4 * 4}  # 4x4 token grid pooled 2x2
        assert set(record["timings"]) >= {"decode", "encode", "prefill", "generate"}
        assert isinstance(record["answer"], str) and record["error"] is None
        assert record["compressor"] == "avgpool:factor=2"
        assert "untrained" in record["model"]  # a random-init model says so
        assert len(record["sha256"]) == 64
    failed = [r for r in records if r["status"] == "error"]
    assert len(failed) == 2
    assert all("corrupt.mp4" in r["error"] and r["answer"] is None for r in failed)


def test_rerun_skips_finished_records_and_retries_errors_only(model_dir, clips, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["annotate", *map(str, clips), "-q", "what colour is the circle?", "--out", str(out),
            "--model", str(model_dir), "--num-frames", "2", "--no-progress"]
    assert main(args) == 3
    first = read_records(out)
    assert main(args) == 3
    second = read_records(out)
    assert second[: len(first)] == first
    added = second[len(first):]
    assert [r["status"] for r in added] == ["error"]  # the two good clips were not answered again


def test_all_good_videos_exit_0_and_answers_are_deterministic(model_dir, clips, tmp_path):
    outs = [tmp_path / "1.jsonl", tmp_path / "2.jsonl"]
    for out in outs:
        assert main(["annotate", str(clips[0]), "-q", "what moves?", "--out", str(out), "--model", str(model_dir),
                     "--num-frames", "3", "--no-progress"]) == 0
    assert read_records(outs[0])[0]["answer"] == read_records(outs[1])[0]["answer"]


@pytest.mark.parametrize("bad_args, message", [
    (["--compressor", "nosuch"], "nosuch"),
    (["--compressor", "avgpool:factr=2"], "factr"),
    (["--model", "no/such-model-here"], "no/such-model-here"),
    (["--fps", "2", "--num-frames", "3"], "fps"),
])
def test_usage_errors_exit_2_with_a_message_naming_the_problem(bad_args, message, clips, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["annotate", str(clips[0]), "-q", "x", "--out", str(tmp_path / "o.jsonl"), *bad_args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_console_entry_point_reports_progress_and_exit_code(model_dir, clips, tmp_path):
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "server.cli", "annotate", str(clips[0]), str(clips[2]),
                             "-q", "what colour is the circle?", "--out", str(out), "--model", str(model_dir),
                             "--num-frames", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    assert "annotate" in result.stderr and "1 ok, 1 failed" in result.stderr
    assert len(read_records(out)) == 2


def test_compressors_command_lists_baselines_with_parameters(capsys):
    assert main(["compressors"]) == 0
    listing = capsys.readouterr().out
    for name in ("none", "avgpool", "uniform", "random"):
        assert name in listing
    assert "factor" in listing and "ratio=" in listing
