"""Batch annotation throughput: `--workers 1` vs `--workers 2`, the local vs the Ray engine, one run.

    python -m eval.bench_annotate                 # 64 ShapesWorld clips, 16 decode-heavy 640x360 clips
    python -m eval.bench_annotate --clips 16 --wide-clips 0 --no-write

ShapesWorld clips decode in milliseconds, so on them the model is all the work; the 640x360
clips cost about as much to decode as to answer, which is what parallel decoding is for.
Every configuration annotates the same clips from scratch (`--overwrite`) with the model on one
torch thread (a Ray actor's default), so what changes is how decoding is laid out: in the main
process (`--workers 0`), in one or two worker processes beside the model, or in Ray tasks
beside a model actor. A thread watches the output file to split each job's time into start-up
(until the first record lands) and the steady rate after it. The Ray cluster is started once,
before timing, as a standing cluster would be; a job's own start-up (its model actor) counts.
The table goes to stdout and, unless --no-write, into docs/BENCHMARKS.md under its own heading.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from eval.shapesworld import write_split
from server.cli import main as vidsieve

HEADING = "## Batch annotation throughput"
BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


@dataclass(frozen=True)
class Config:
    label: str
    args: tuple[str, ...]


CONFIGS = (
    Config("local, `--workers 0` (decode in the main process)", ("--workers", "0", "--threads", "1")),
    Config("local, `--workers 1`", ("--workers", "1", "--threads", "1")),
    Config("local, `--workers 2`", ("--workers", "2", "--threads", "1")),
    Config("Ray Data, 1 model actor, decode tasks", ("--engine", "ray", "--ray-actors", "1")),
)
BASELINE = 1  # ratios are against `--workers 1`


@dataclass
class Timing:
    """Seconds from calling `vidsieve annotate` (in this process, so no interpreter start-up)."""

    job_s: float  # load the model, open the output, start workers or actors, answer everything
    first_record_s: float  # until the first record was on disk
    last_record_s: float  # until the last one was
    records_at_first: int  # how many records the first sighting of the file held

    def videos_per_s(self, videos: int) -> float:
        return videos / self.job_s

    def steady_videos_per_s(self, videos: int, records: int) -> float:
        """The rate once the first record is out: start-up (actor, workers, first clip) left aside."""
        span_s = self.last_record_s - self.first_record_s
        return (records - self.records_at_first) / span_s * videos / records if span_s > 0 else float("nan")


def time_job(argv: list[str], out: Path, records: int) -> Timing:
    """Run one annotate job in this process while a thread watches its output file grow."""
    seen: list[tuple[float, int]] = []  # (seconds since start, records on disk)
    done = threading.Event()
    out.unlink(missing_ok=True)
    started = time.perf_counter()

    def watch() -> None:
        while not done.is_set():
            count = out.read_bytes().count(b"\n") if out.exists() else 0
            if count and (not seen or count != seen[-1][1]):
                seen.append((time.perf_counter() - started, count))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        code = vidsieve(argv)
    job_s = time.perf_counter() - started
    done.set()
    watcher.join()
    if code != 0 or out.read_bytes().count(b"\n") != records or not seen:
        raise RuntimeError(f"annotate exited {code}: {stderr.getvalue()[-2000:]}")
    return Timing(job_s, seen[0][0], seen[-1][0], seen[0][1])


@dataclass(frozen=True)
class ClipSet:
    name: str
    inputs: tuple[str, ...]  # annotate arguments naming the videos and their questions
    videos: int
    records: int
    description: str


def shapesworld_clips(folder: Path, count: int, questions_per_clip: int) -> ClipSet:
    manifest = write_split("test", count, folder, questions_per_clip=questions_per_clip)
    records = len(json.loads(manifest.read_text()))
    return ClipSet("ShapesWorld", ("--manifest", str(manifest)), count, records,
                   f"{count} ShapesWorld `test` clips (128 px, 16 frames, lossless H.264, ~5 KB) with "
                   f"{questions_per_clip} questions each from their manifest")


def wide_clips(folder: Path, count: int) -> ClipSet:
    """Clips whose decoding costs about as much as answering: 640x360 H.264, 8 s at 30 fps."""
    import av  # PyAV; only this clip set needs an encoder

    folder.mkdir(parents=True)
    texture = np.random.default_rng(0).integers(0, 256, (360, 640, 3), np.uint8)  # [H, W, 3]
    for index in range(count):
        with av.open(str(folder / f"wide_{index:03d}.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
            for frame_index in range(240 + index):  # lengths differ, so every clip hashes differently
                frame = av.VideoFrame.from_ndarray(np.roll(texture, 4 * frame_index + index, axis=1), format="rgb24")
                frame.pts, frame.time_base = frame_index, Fraction(1, 30)
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    return ClipSet("640x360", (str(folder), "--question", "What colour is the circle?"), count, count,
                   f"{count} clips of 640x360 moving noise, 8 s at 30 fps (H.264, ~0.5 MB), one question each")


def run(clip_sets: list[ClipSet], repeats: int, model: str, with_ray: bool, folder: Path) -> str:
    configs = [config for config in CONFIGS if with_ray or "--engine" not in config.args]
    if with_ray:
        import ray

        ray_start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        ray_start_s = time.perf_counter() - ray_start
    lines = [
        "| clips | configuration | videos/s (whole job) | vs `--workers 1` | first record after (s) | videos/s after it |",
        "|---|---|---:|---:|---:|---:|",
    ]
    try:
        for clips in clip_sets:
            # One untimed job first: the first model load, first forward passes and a cold file
            # cache would otherwise be billed to whichever row came first.
            time_job(["annotate", *clips.inputs, "--out", str(folder / "out.jsonl"), "--model", model,
                      "--no-progress", *configs[0].args], folder / "out.jsonl", clips.records)
            rows = []
            for config in configs:
                out = folder / "out.jsonl"
                argv = ["annotate", *clips.inputs, "--out", str(out), "--model", model, "--overwrite",
                        "--no-progress", *config.args]
                # The best of `repeats` runs: other load on the machine only ever slows a run down.
                timing = min((time_job(argv, out, clips.records) for _ in range(repeats)), key=lambda t: t.job_s)
                rows.append((config, timing))
                rate = timing.videos_per_s(clips.videos)
                print(f"{clips.name}, {config.label}: {rate:.2f} videos/s", file=sys.stderr)
            base = rows[BASELINE][1].videos_per_s(clips.videos)
            for config, timing in rows:
                rate = timing.videos_per_s(clips.videos)
                steady = timing.steady_videos_per_s(clips.videos, clips.records)
                lines.append(f"| {clips.name} | {config.label} | {rate:.2f} | {rate / base:.2f}x | "
                             f"{timing.first_record_s:.1f} | {steady:.2f} |")
    finally:
        if with_ray:
            ray.shutdown()
    notes = [f"- {clips.name}: {clips.description}." for clips in clip_sets]
    notes.append(encoder_batching_note(model, folder / "shapesworld"))
    notes.append(f"- Model `{model}` on CPU with one torch thread in every row; best of {repeats} runs per row. "
                 "A job's time runs from calling `vidsieve annotate` in-process (model load included) to its end.")
    if with_ray:
        notes.append(f"- The local Ray cluster (`ray.init(num_cpus={os.cpu_count()})`) took {ray_start_s:.1f} s to "
                     "start, before timing; each Ray job's time includes starting its model actor.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def encoder_batching_note(model_name: str, manifest_folder: Path, clip_count: int = 8) -> str:
    """Whether encoding several clips' frames in one call beats one call per clip (it would let
    the model batch across videos; the LM runner itself takes one sequence at a time)."""
    import torch

    from streaming import open_video
    from vlm.model import VLM

    model = VLM.from_pretrained(model_name)
    clips = [np.stack([frame.rgb for frame in open_video(path, num_frames=model.config.num_frames)])
             for path in sorted(manifest_folder.glob("*.mp4"))[:clip_count]]  # each [T, H, W, 3]
    torch.set_num_threads(1)

    def best_of_5(encode) -> float:
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            encode()
            timings.append(time.perf_counter() - start)
        return min(timings)

    together_s = best_of_5(lambda: model.encoder.encode(np.concatenate(clips)))
    apart_s = best_of_5(lambda: [model.encoder.encode(clip) for clip in clips])
    return (f"- Batching: the vision encoder takes {1000 * together_s:.0f} ms for {len(clips)} ShapesWorld clips' "
            f"frames in one call and {1000 * apart_s:.0f} ms in one call per clip (one thread), so the job "
            "encodes clip by clip.")


def machine() -> str:
    model_name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{os.cpu_count()}-core CPU ({model_name}), no GPU; load average at start {load}"


def write_section(text: str, path: Path = BENCHMARKS_MD) -> None:
    """Put `text` under HEADING in `path`, replacing that section only."""
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    start = current.find(HEADING + "\n")
    if start < 0:
        updated = current.rstrip("\n") + "\n\n" + text
    else:
        end = current.find("\n## ", start + len(HEADING))
        updated = current[:start] + text + ("" if end < 0 else "\n" + current[end + 1:])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated.rstrip("\n") + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_annotate", description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64, help="ShapesWorld clips")
    parser.add_argument("--questions-per-clip", type=int, default=2)
    parser.add_argument("--wide-clips", type=int, default=16, help="640x360 clips that cost real decoding (0: none)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="vidsieve-tiny")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not update {BENCHMARKS_MD.name}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with_ray = not args.no_ray
    if with_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            sys.exit("the Ray rows need Ray: pip install 'vidsieve[ray]' (or pass --no-ray)")
    command = "python -m eval.bench_annotate" + "".join(f" {shlex.quote(arg)}" for arg in (argv or sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="bench-annotate-") as folder:
        folder = Path(folder)
        clip_sets = [shapesworld_clips(folder / "shapesworld", args.clips, args.questions_per_clip)]
        if args.wide_clips:
            clip_sets.append(wide_clips(folder / "wide", args.wide_clips))
        table = run(clip_sets, args.repeats, args.model, with_ray, folder)
    date = time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())
    section = (f"{HEADING}\n\n`{command}` on a {machine()}, {date}.\n\n{table}")
    print(section)
    if not args.no_write:
        write_section(section)


if __name__ == "__main__":
    main()
