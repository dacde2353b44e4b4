"""ENAT-style reuse benchmark: patch-reuse encoding and KV reuse across questions.

    python -m eval.bench_reuse [--model vidsieve-tiny] [--clips 8] [--repeats 3]

Patch reuse: the encoder re-encodes only the patches that changed since the last frame. On
a static clip (one frame repeated) and on moving ShapesWorld clips it reports the encode time
against full recomputation of each frame as it arrives (the streaming baseline: one frame at
a time) and against encoding the whole clip in one batch (the offline baseline), both in the
same run (median of repeats), the fraction of patches skipped and the feature error relative
to full recomputation, ||f_reuse - f_full|| / ||f_full||.
KV reuse: three questions about one clip, each with its own prefill vs one video prefill
shared by all three (`VLM.prefill_video` + `stream_reused`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from eval import shapesworld as sw
from vlm.encoder import PatchReuseEncoder
from vlm.model import VLM

QUESTIONS = ("What colour is the circle?", "How many objects are there at the end?",
             "Which direction does the square move?")


def timed(fn, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def patch_reuse_rows(model: VLM, clips: list[tuple[str, np.ndarray]], repeats: int, threshold: float,
                     refresh: int) -> list[dict]:
    rows = []
    for name, frames in clips:
        batched_s, full = timed(lambda: model.encoder.encode(frames).tokens, repeats)
        per_frame_s, _ = timed(lambda: [model.encoder.encode(frames[i:i + 1]) for i in range(len(frames))], repeats)
        encoders = []

        def reuse():
            encoder = PatchReuseEncoder(model.encoder, threshold=threshold, refresh_every=refresh)
            encoders.append(encoder)
            return encoder.encode(frames).tokens

        reuse_s, reused = timed(reuse, repeats)
        error = float((reused - full).norm() / full.norm())
        rows.append({"clip": name, "speedup": per_frame_s / reuse_s, "vs_batched": batched_s / reuse_s,
                     "skipped": encoders[-1].stats.skipped_fraction, "error": error})
    return rows


def kv_reuse_row(model: VLM, frames: np.ndarray, repeats: int) -> dict:
    tokens = model.encode_frames(frames, np.arange(len(frames)) / 8.0)
    sampling = model.default_sampling(4)

    def separate():
        return [model.answer_tokens(tokens, q, "none", sampling).token_ids for q in QUESTIONS]

    def shared():
        video = model.prefill_video(tokens, "none")
        return [list(model.stream_reused(video, q, sampling)) for q in QUESTIONS]

    separate_s, expected = timed(separate, repeats)
    shared_s, answers = timed(shared, repeats)
    return {"separate_s": separate_s, "shared_s": shared_s, "speedup": separate_s / shared_s,
            "same_answers": answers == expected}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_reuse", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vidsieve-tiny")
    parser.add_argument("--clips", type=int, default=8, help="moving ShapesWorld clips (test split)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.02)
    parser.add_argument("--refresh", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = VLM.from_pretrained(args.model, device="cpu")
    moving = [(f"test_{i}", frames) for i, (frames, _) in enumerate(sw.iter_samples("test", 0, args.clips))]
    static = [("static", np.repeat(moving[0][1][:1], len(moving[0][1]), axis=0))]
    rows = patch_reuse_rows(model, static + moving, args.repeats, args.threshold, args.refresh)
    print(f"Patch reuse, threshold {args.threshold}, full refresh every {args.refresh} frames "
          f"({model.display_name}, {len(moving[0][1])} frames of 128 px per clip)\n")
    print("| clip | patches skipped | speed vs full, frame by frame | speed vs full, whole clip batched "
          "| feature error (relative L2) |")
    print("|---|---:|---:|---:|---:|")
    print_row = "| {clip} | {skipped:.1%} | {speedup:.2f}x | {vs_batched:.2f}x | {error:.2e} |"
    print(print_row.format(**rows[0]))
    moving_rows = rows[1:]
    summary = {"clip": f"moving (mean of {len(moving_rows)})",
               **{key: statistics.mean(r[key] for r in moving_rows) for key in ("skipped", "speedup", "vs_batched", "error")}}
    print(print_row.format(**summary))
    kv = kv_reuse_row(model, moving[0][1], args.repeats)
    print("\nKV reuse, three questions about one clip (greedy, 4 new tokens each)\n")
    print("| per-question prefill | one shared video prefill | speedup | same answers |")
    print("|---:|---:|---:|---|")
    print(f"| {kv['separate_s'] * 1000:.0f} ms | {kv['shared_s'] * 1000:.0f} ms | {kv['speedup']:.2f}x | "
          f"{'yes' if kv['same_answers'] else 'NO'} |")


if __name__ == "__main__":
    main()
