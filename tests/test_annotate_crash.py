"""Exactly once under crashes: SIGKILL the job at random points, rerun, count every record."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.cli import main
from tests.annotate_fixtures import answers_by_id, read_records, save_talkative_model, write_clips, write_corrupt

QUESTIONS = ("what colour is the circle?", "how many objects?")
KILLS = 4  # one during start-up, three while records are being written


def complete_lines(path: Path) -> list[dict]:
    """Records of every newline-terminated line (a torn tail is the one thing a kill may leave)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def children_of(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc")
def test_a_job_killed_with_sigkill_at_random_points_then_rerun_writes_every_record_exactly_once(tmp_path):
    model = save_talkative_model(tmp_path / "model")
    clips = [*write_clips(tmp_path / "clips", 8), write_corrupt(tmp_path / "clips" / "corrupt.mp4")]
    args = ["annotate", *map(str, clips), *(arg for q in QUESTIONS for arg in ("-q", q)), "--model", str(model),
            "--num-frames", "3", "--max-new-tokens", "8", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "reference.jsonl"), "--workers", "0", "--threads", "1"]) == 3
    expected = answers_by_id(read_records(tmp_path / "reference.jsonl"))
    assert len(expected) == len(clips) * len(QUESTIONS)

    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "server.cli", *args, "--out", str(out), "--workers", "2"]
    rng = random.Random(8)
    for kill in range(KILLS):
        written_before = len(complete_lines(out))
        # The first kill lands during start-up; the others once the job has written a random
        # number of new records, a random few milliseconds later: anywhere in a record's life.
        target = written_before + (0 if kill == 0 else rng.randint(1, 3))
        job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill == 0:
            time.sleep(rng.uniform(0.2, 1.5))
        deadline = time.monotonic() + 120
        while job.poll() is None and len(complete_lines(out)) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))
        workers = children_of(job.pid)
        job.send_signal(signal.SIGKILL)
        job.wait()
        assert job.returncode == -signal.SIGKILL, "the job should still have been running"
        written = complete_lines(out)
        assert target <= len(written) < len(expected)
        assert len({r["id"] for r in written}) == len(written)  # no duplicate so far
        gone_by = time.monotonic() + 5
        while any(is_running(pid) for pid in workers) and time.monotonic() < gone_by:
            time.sleep(0.05)
        assert not any(is_running(pid) for pid in workers), "decode workers outlived the killed job"

    final = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert final.returncode == 3, final.stderr
    records = read_records(out)  # every line parses
    assert [r["id"] for r in records].count(records[0]["id"]) == 1
    assert len(records) == len({r["id"] for r in records}) == len(expected)
    assert answers_by_id(records) == expected
    assert out.read_text().endswith("\n")
