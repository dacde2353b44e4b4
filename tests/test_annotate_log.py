"""The annotation output file: torn-tail repair, one record per id, refusing foreign lines, one writer."""

import json
import multiprocessing
from pathlib import Path

import pytest

from server.annotate_log import AnnotationLog, AnnotationLogError
from server.annotate_work import IdSet, record_key


def record(record_id: str, status: str = "ok", answer: str = "red") -> dict:
    return {"id": record_id, "status": status, "answer": answer if status == "ok" else None}


def line(record_id: str, status: str = "ok", answer: str = "red") -> str:
    return json.dumps(record(record_id, status, answer)) + "\n"


ID_A, ID_B, ID_C = (record_key("sha", question, "model", "none") for question in "abc")


def test_a_torn_last_line_is_truncated_away_and_reported(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    whole = line(ID_A) + line(ID_B)
    out.write_text(whole + line(ID_C)[:17])  # what a kill in the middle of a write would leave
    with AnnotationLog(out) as log:
        assert log.statuses == {ID_A: "ok", ID_B: "ok"}  # the torn record does not count
        assert out.read_text() == whole
        log.append(record(ID_C))
    assert [json.loads(text)["id"] for text in out.read_text().splitlines()] == [ID_A, ID_B, ID_C]
    assert "dropped a torn last line (17 bytes)" in capsys.readouterr().err


def test_a_file_that_is_only_a_torn_line_becomes_empty(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "0123')
    with AnnotationLog(out) as log:
        assert log.statuses == {}
    assert out.read_bytes() == b""


def test_a_line_that_is_not_a_record_in_the_middle_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "out.jsonl"
    text = line(ID_A) + "not json\n" + line(ID_B)
    out.write_text(text)
    with pytest.raises(AnnotationLogError, match="line 2 is not an annotation record"):
        with AnnotationLog(out):
            pass
    assert out.read_text() == text


def test_a_retried_id_keeps_only_its_last_record_once_the_job_ends(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(line(ID_A, "error") + line(ID_B))
    with AnnotationLog(out) as log:
        log.append(record(ID_A, "ok", "blue"))
        assert log.statuses == {ID_A: "ok", ID_B: "ok"}
    assert out.read_text() == line(ID_B) + line(ID_A, "ok", "blue")


def test_duplicates_left_by_a_killed_retry_are_removed_when_the_next_job_opens_the_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(line(ID_A, "error") + line(ID_B) + line(ID_A, "ok", "blue"))
    with AnnotationLog(out) as log:
        assert out.read_text() == line(ID_B) + line(ID_A, "ok", "blue")
        assert log.statuses == {ID_A: "ok", ID_B: "ok"}


def test_overwrite_starts_from_an_empty_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(line(ID_A))
    with AnnotationLog(out, overwrite=True) as log:
        assert log.statuses == {}
        log.append(record(ID_B))
    assert out.read_text() == line(ID_B)


def _try_to_open(path: Path, answers: multiprocessing.Queue) -> None:
    try:
        with AnnotationLog(path):
            answers.put("opened")
    except AnnotationLogError as error:
        answers.put(str(error))


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out.jsonl"
    context = multiprocessing.get_context("fork")  # another process: POSIX locks are per process
    answers = context.Queue()
    with AnnotationLog(out):
        other = context.Process(target=_try_to_open, args=(out, answers))
        other.start()
        assert "another annotate job is writing" in answers.get(timeout=60)
        other.join()
    other = context.Process(target=_try_to_open, args=(out, answers))
    other.start()
    assert answers.get(timeout=60) == "opened"  # free again once the first job is done
    other.join()


def test_id_set_holds_exactly_the_ids_it_was_given():
    ids = [record_key(f"sha{index}", "q", "m", "c") for index in range(1000)]
    members = IdSet(ids[::2])
    assert len(members) == 500
    assert all(record_id in members for record_id in ids[::2])
    assert not any(record_id in members for record_id in ids[1::2])
    assert "ffffffffffffffff" not in IdSet() and "0000000000000000" in IdSet(["0000000000000000"])
