"""Write a ShapesWorld manifest in the public benchmarks' layouts (MVBench, Video-MME).

The accuracy harness reads those layouts for real benchmarks pointed at a local video folder;
these writers make small fixtures from ShapesWorld that prove the loaders, and let anyone
run a public-format pipeline end to end offline.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from eval.accuracy import LETTERS


def write_mvbench(shapesworld_manifest: Path, out_dir: Path) -> Path:
    """One MVBench task file per question type: [{"video", "question", "candidates", "answer"}]."""
    rows = json.loads(Path(shapesworld_manifest).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        tasks[row["type"]].append({"video": row["video"], "question": row["question"],
                                   "candidates": row["candidates"], "answer": row["answer"]})
    for task, items in tasks.items():
        (out_dir / f"{task}.json").write_text(json.dumps(items, indent=1))
    return out_dir


def write_videomme(shapesworld_manifest: Path, out_path: Path) -> Path:
    """Video-MME rows (JSON, or parquet when `out_path` ends in .parquet): lettered options,
    the answer as a letter, videos named `<videoID>.mp4`."""
    rows = json.loads(Path(shapesworld_manifest).read_text())
    records = []
    for number, row in enumerate(rows):
        records.append({
            "video_id": f"{number:03d}", "duration": "short", "domain": "ShapesWorld",
            "sub_category": row["type"], "url": "", "videoID": Path(row["video"]).stem,
            "question_id": f"{Path(row['video']).stem}-{number}", "task_type": row["type"],
            "question": row["question"],
            "options": [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["candidates"])],
            "answer": LETTERS[row["candidates"].index(row["answer"])],
        })
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".parquet":
        import pandas

        pandas.DataFrame(records).to_parquet(out_path)
    else:
        out_path.write_text(json.dumps(records, indent=1))
    return out_path
