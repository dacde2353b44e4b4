"""`--engine ray` on a local two-CPU Ray cluster: the local engine's records, and its resume semantics."""

import pytest

from server.cli import main
from tests.annotate_fixtures import answers_by_id, read_records, save_talkative_model, write_clips, write_corrupt

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

QUESTIONS = ("what colour is the circle?", "how many objects?")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_the_ray_engine_writes_the_local_engines_records_and_resumes_the_same_way(local_ray, tmp_path):
    model = save_talkative_model(tmp_path / "model")
    clips = [*write_clips(tmp_path / "clips", 3), write_corrupt(tmp_path / "clips" / "corrupt.mp4")]
    args = ["annotate", *map(str, clips), *(arg for q in QUESTIONS for arg in ("-q", q)), "--model", str(model),
            "--num-frames", "3", "--compressor", "random:ratio=0.5", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "local.jsonl")]) == 3
    local = answers_by_id(read_records(tmp_path / "local.jsonl"))

    on_ray = tmp_path / "ray.jsonl"
    started = (tmp_path / "local.jsonl").read_text().splitlines(keepends=True)[:3]
    on_ray.write_text("".join(started))  # as if a local job had been stopped after three answers
    assert main([*args, "--out", str(on_ray), "--engine", "ray"]) == 3
    records = read_records(on_ray)
    assert on_ray.read_text().startswith("".join(started))  # finished records are kept, not redone
    assert len(records) == len(clips) * len(QUESTIONS)
    assert answers_by_id(records) == local  # same ids, answers, statuses, frame and token counts
    assert any(r["answer"] for r in records if r["status"] == "ok")  # not trivially equal empty answers
    assert all("corrupt.mp4" in r["error"] for r in records if r["status"] == "error")

    written = on_ray.read_bytes()
    assert main([*args, "--out", str(on_ray), "--engine", "ray"]) == 3  # a rerun skips ok and error records
    assert on_ray.read_bytes() == written
