"""Shared pieces of the `vidsieve annotate` tests: a tiny model folder, clips, reading records."""

import json
from pathlib import Path

import torch

from tests.video_fixtures import write_video
from vlm.model import VLM, VLMConfig

CORRUPT_BYTES = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4
ANSWER_FIELDS = ("id", "video", "sha256", "question", "answer", "status", "error", "model", "compressor",
                 "frames", "visual_tokens")  # every record field but timings


def save_talkative_model(folder: Path) -> Path:
    """A random-init vidsieve-tiny whose LM vocabulary is exactly its tokenizer's.

    With the preset's larger vocabulary a random model mostly picks ids with no word and answers
    "", which would make any two runs agree trivially; this one answers in words.
    """
    config = VLMConfig.from_name("vidsieve-tiny")
    model = VLM.from_config(config)
    config.lm["vocab_size"] = len(model.tokenizer)
    model = VLM.from_config(config)
    with torch.no_grad():  # sharper logits (as server_fixtures.tiny_model): answers differ by clip and question
        for parameter in model.lm.parameters():
            parameter.mul_(4.0)
    model.save_pretrained(folder)
    return folder


def write_clips(folder: Path, count: int) -> list[Path]:
    """`count` small, distinct clips (different lengths, so different content hashes)."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for index in range(count):
        path = folder / f"clip{index}.mp4"
        write_video(path, frame_count=6 + index, fps=6)
        clips.append(path)
    return clips


def write_corrupt(path: Path) -> Path:
    path.write_bytes(CORRUPT_BYTES)
    return path


def read_records(path: Path) -> list[dict]:
    """Every line of the output, parsed; fails on any line that is not JSON."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def answers_by_id(records: list[dict]) -> dict[str, tuple]:
    """What two runs must agree on, by record id (timings aside)."""
    return {record["id"]: tuple(json.dumps(record[name], sort_keys=True) for name in ANSWER_FIELDS)
            for record in records}
