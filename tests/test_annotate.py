"""`vidsieve annotate` end to end: inputs, records, exit codes, resume, retries, parallel decode."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.annotate_work import AnnotateInputError, WorkItem, collect_work
from server.cli import main
from tests.annotate_fixtures import answers_by_id
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


def test_plain_rerun_skips_ok_and_error_records_and_still_exits_3(model_dir, clips, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = ["annotate", *map(str, clips), "-q", "what colour is the circle?", "--out", str(out),
            "--model", str(model_dir), "--num-frames", "2", "--no-progress"]
    assert main(args) == 3
    first = out.read_bytes()
    capsys.readouterr()
    assert main(args) == 3  # the error record is still this job's outcome
    assert out.read_bytes() == first  # nothing answered again, nothing appended
    assert "0 ok, 0 failed, 3 skipped (1 of them errors" in capsys.readouterr().err


def test_retry_failed_redoes_only_error_records_and_leaves_one_record_per_id(model_dir, clips, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    args = ["annotate", *map(str, clips[:2]), "-q", "what colour is the circle?", "-q", "how many objects?",
            "--out", str(out), "--model", str(model_dir), "--num-frames", "2", "--no-progress"]
    real_answer = VLM.answer_tokens

    def flaky_answer(self, tokens, question, *rest, **kwargs):
        if question == "how many objects?":
            raise RuntimeError("out of memory")
        return real_answer(self, tokens, question, *rest, **kwargs)

    monkeypatch.setattr(VLM, "answer_tokens", flaky_answer)
    assert main(args) == 3
    first = read_records(out)
    assert [r["status"] for r in first].count("error") == 2
    assert all("internal error: RuntimeError: out of memory" in r["error"] for r in first if r["status"] == "error")
    monkeypatch.setattr(VLM, "answer_tokens", real_answer)
    assert main(args) == 3  # a plain rerun leaves the errors alone
    assert read_records(out) == first
    assert main([*args, "--retry-failed"]) == 0
    final = read_records(out)
    assert len(final) == len({r["id"] for r in final}) == 4
    assert all(r["status"] == "ok" for r in final)
    ok_before = [r for r in first if r["status"] == "ok"]
    assert final[: len(ok_before)] == ok_before  # ok records were not redone or moved
    assert {r["id"] for r in final} == {r["id"] for r in first}


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
    (["--workers", "-1"], "--workers"),
    (["--manifest", "no-such.jsonl"], "no-such.jsonl"),
])
def test_usage_errors_exit_2_with_a_message_naming_the_problem(bad_args, message, clips, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["annotate", str(clips[0]), "-q", "x", "--out", str(tmp_path / "o.jsonl"), *bad_args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("inputs, message", [
    (["{folder}/*.avi"], "pattern '{folder}/*.avi' matches no video file"),
    (["{empty}"], "folder '{empty}' holds no video files"),
    (["{folder}/a.mp4"], "no question for '{folder}/a.mp4'"),
    ([], "no videos to annotate"),
])
def test_inputs_that_name_no_video_or_no_question_are_usage_errors(inputs, message, clips, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    names = {"folder": clips[0].parent, "empty": tmp_path / "empty"}
    assert main(["annotate", *(arg.format(**names) for arg in inputs), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert message.format(**names) in capsys.readouterr().err


def test_folders_globs_and_manifests_expand_to_videos_with_their_own_questions(tmp_path):
    library = tmp_path / "library"
    (library / "deep" / "deeper").mkdir(parents=True)
    for name in ("one.mp4", "deep/two.MKV", "deep/deeper/three.webm", "notes.txt", "deep/manifest.json"):
        (library / name).write_bytes(b"x")
    assert collect_work([library], [], ["q"]) == [  # recursive, by extension, sorted
        WorkItem(str(library / "deep/deeper/three.webm"), ("q",)),
        WorkItem(str(library / "deep/two.MKV"), ("q",)),
        WorkItem(str(library / "one.mp4"), ("q",)),
    ]
    by_pattern = collect_work([f"{library}/**/*.webm"], [], ["q"])
    assert [w.video for w in by_pattern] == [str(library / "deep/deeper/three.webm")]

    (tmp_path / "rows.jsonl").write_text('{"video": "library/one.mp4", "question": "what colour?"}\n\n'
                                         '{"video": "library/one.mp4", "questions": ["how many?", "what colour?"]}\n'
                                         '{"video": "library/deep/two.MKV"}\n')
    (tmp_path / "rows.csv").write_text("video,question\nlibrary/deep/deeper/three.webm,which way?\n")
    (library / "deep" / "manifest.json").write_text(json.dumps([{"video": "two.MKV", "question": "is it big?"}]))
    work = collect_work([library / "one.mp4"], [tmp_path / "rows.jsonl", tmp_path / "rows.csv",
                                                library / "deep" / "manifest.json"], ["global?"])
    assert [(Path(w.video).relative_to(tmp_path).as_posix(), w.questions) for w in work] == [
        ("library/one.mp4", ("global?", "what colour?", "how many?")),  # listed twice: asked once each
        ("library/deep/two.MKV", ("global?", "is it big?")),  # a row without a question gets --question
        ("library/deep/deeper/three.webm", ("which way?",)),
    ]


@pytest.mark.parametrize("manifest_name, text, message", [
    ("m.csv", "path,question\na.mp4,q\n", "'video' column"),
    ("m.jsonl", '{"video": "a.mp4"}\n{"video": \n', "line 2 is not JSON"),
    ("m.json", '{"video": "a.mp4"}', "must be a list"),
    ("m.jsonl", '{"question": "q"}\n', "needs a 'video' path"),
    ("m.txt", "a.mp4\n", "unknown format"),
])
def test_a_malformed_manifest_is_refused_with_the_reason(manifest_name, text, message, tmp_path):
    (tmp_path / manifest_name).write_text(text)
    with pytest.raises(AnnotateInputError, match=re.escape(message)):
        collect_work([], [tmp_path / manifest_name], ["q"])


def test_a_manifest_job_answers_each_video_its_own_questions(model_dir, clips, tmp_path):
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in [
        {"video": str(clips[0]), "questions": ["what colour is the circle?", "how many objects?"]},
        {"video": str(clips[1]), "question": "what moves?"}]))
    out = tmp_path / "out.jsonl"
    assert main(["annotate", "--manifest", str(manifest), "--out", str(out), "--model", str(model_dir),
                 "--num-frames", "2", "--no-progress"]) == 0
    asked = sorted((Path(r["video"]).name, r["question"]) for r in read_records(out))
    assert asked == [("a.mp4", "how many objects?"), ("a.mp4", "what colour is the circle?"), ("b.webm", "what moves?")]


def test_parallel_decode_workers_write_the_same_records_as_decoding_in_the_main_process(model_dir, clips, tmp_path):
    outs = {workers: tmp_path / f"workers{workers}.jsonl" for workers in (0, 2)}
    for workers, out in outs.items():
        assert main(["annotate", *map(str, clips), "-q", "what colour is the circle?", "-q", "what moves?",
                     "--out", str(out), "--model", str(model_dir), "--num-frames", "3", "--no-progress",
                     "--workers", str(workers), "--threads", "1"]) == 3
    in_process, parallel = (answers_by_id(read_records(out)) for out in outs.values())
    assert len(parallel) == 6
    assert parallel == in_process


def test_the_same_video_under_two_paths_is_answered_once(model_dir, clips, tmp_path, capsys):
    copy = tmp_path / "copy-of-a.mp4"
    copy.write_bytes(clips[0].read_bytes())
    out = tmp_path / "out.jsonl"
    assert main(["annotate", str(clips[0]), str(copy), "-q", "what moves?", "--out", str(out),
                 "--model", str(model_dir), "--num-frames", "2", "--no-progress"]) == 0
    assert len(read_records(out)) == 1  # the id is the content's, not the path's
    assert "1 ok, 0 failed, 1 skipped" in capsys.readouterr().err


def test_the_ray_engine_without_ray_names_the_extra_to_install(clips, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code = main(["annotate", str(clips[0]), "-q", "x", "--out", str(tmp_path / "o.jsonl"), "--engine", "ray"])
    assert code == 2
    assert "pip install 'vidsieve[ray]'" in capsys.readouterr().err


def test_console_entry_point_reports_progress_and_exit_code(model_dir, clips, tmp_path):
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "server.cli", "annotate", str(clips[0]), str(clips[2]),
                             "-q", "what colour is the circle?", "--out", str(out), "--model", str(model_dir),
                             "--num-frames", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    assert "1 ok, 1 failed, 0 skipped" in result.stderr and "videos/s" in result.stderr
    progress = re.findall(r"annotate: 100%.*?\| 2/2 \[[\d:]+<[\d:]+, +[\d.]+(?:s/video|video/s)", result.stderr)
    assert progress, result.stderr  # a tqdm bar over videos, with elapsed<ETA and a rate
    assert len(read_records(out)) == 2


def test_compressors_command_lists_baselines_with_parameters(capsys):
    assert main(["compressors"]) == 0
    listing = capsys.readouterr().out
    for name in ("none", "avgpool", "uniform", "random"):
        assert name in listing
    assert "factor" in listing and "ratio=" in listing


def test_answers_under_another_attention_are_new_records_not_skips(model_dir, clips, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["annotate", str(clips[0]), "-q", "what moves?", "--out", str(out), "--model", str(model_dir),
            "--num-frames", "2", "--no-progress"]
    assert main(args) == 0
    assert main([*args, "--attention", "bra:topk=1,block=8"]) == 0
    dense, routed = read_records(out)
    assert dense["id"] != routed["id"]
    assert routed["model"] == f"{dense['model']}, attention bra:topk=1,block=8,sinks=1,regions=blocks"


def test_reuse_kv_and_patches_give_the_same_answers_and_report_what_they_skipped(model_dir, clips, tmp_path):
    plain, reused = tmp_path / "plain.jsonl", tmp_path / "reused.jsonl"
    questions = ["-q", "what colour is the circle?", "-q", "how many objects?"]
    common = [str(clips[0]), *questions, "--model", str(model_dir), "--num-frames", "4", "--no-progress"]
    assert main(["annotate", *common, "--out", str(plain)]) == 0
    assert main(["annotate", *common, "--out", str(reused), "--reuse", "kv+patches:threshold=0,refresh=100"]) == 0
    records = read_records(reused)
    assert [r["answer"] for r in records] == [r["answer"] for r in read_records(plain)]
    for record in records:
        assert record["reuse"]["video_prefills"] == 1 and record["reuse"]["questions_sharing_it"] == 2
        assert 0 <= record["reuse"]["patches_skipped"] < 1


def test_a_bad_reuse_spec_is_a_usage_error(clips, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", str(clips[0]), "-q", "x", "--out", str(tmp_path / "o.jsonl"), "--reuse", "cache"])
    assert exit_info.value.code == 2
    assert "unknown reuse" in capsys.readouterr().err
