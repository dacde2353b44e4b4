"""Prefill time of compressors on a 0.5B-shaped Qwen2 language model.

    python -m eval.bench_prefill [--repeats 3] [--frames 8] [--methods none todre:ratio=0.1 ...]

The language model has Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocabulary 151936, tied embeddings) with random weights: timing does not
depend on them. The clip is `--frames` frames of 14 x 14 random visual tokens (8 x 196 =
1568 by default), as LLaVA-style towers give after pooling. Every method answers the same
question with one new token; each is warmed up once, then timed `--repeats` times in
interleaved rounds (every method once per round), and the table gives the medians and the
ratio to `none` measured in the same run. `compress` is the time before the LM (learned
and question-aware methods included); `prefill` is the LM's prefill (VideoScan's frame-by-frame
prefill with carriers included). A method not registered yet is skipped with a note.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from compressors import VisualTokens, list_compressors, parse_spec
from vlm.lm_runner import SamplingParams
from vlm.model import PRESETS, VLM, VLMConfig

QWEN2_0_5B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True}
METHODS = ("none", "todre:ratio=0.1", "videoscan", "quecc")
QUESTION = "what colour is the circle ?"


def build_model() -> VLM:
    """vidsieve-tiny's vision side (unused: tokens are given) around a 0.5B-shaped Qwen2."""
    config = VLMConfig(**dict(PRESETS["vidsieve-tiny"], name="qwen2-0.5b-shaped", lm=QWEN2_0_5B))
    return VLM.from_config(config, seed=0)


def clip_tokens(frames: int, side: int, width: int) -> VisualTokens:
    embeds = 0.02 * torch.randn(frames, side, side, width, generator=torch.Generator().manual_seed(0))
    return VisualTokens.from_grid(embeds, [0.5 * t for t in range(frames)])


def time_once(model: VLM, tokens: VisualTokens, method: str) -> dict[str, float]:
    timings: dict[str, float] = {}
    sampling = SamplingParams(max_new_tokens=1)
    for _ in model.stream_tokens(tokens, QUESTION, parse_spec(method), sampling, timings):
        pass
    return timings


def run(methods: list[str], repeats: int, frames: int, side: int) -> list[dict]:
    registered = {info.name for info in list_compressors()}
    for method in [m for m in methods if m.split(":")[0] not in registered]:
        print(f"note: {method.split(':')[0]!r} is not registered yet; skipped")
    methods = [m for m in methods if m.split(":")[0] in registered]
    model = build_model()
    tokens = clip_tokens(frames, side, QWEN2_0_5B["hidden_size"])
    samples: dict[str, list[dict]] = {method: [] for method in methods}
    with torch.inference_mode():
        for method in methods:  # warm-up (and the learned methods build their modules)
            time_once(model, tokens, method)
        for _ in range(repeats):
            for method in methods:
                samples[method].append(time_once(model, tokens, method))
    rows = []
    for method in methods:
        median = {key: statistics.median(s[key] for s in samples[method])
                  for key in ("compress", "prefill", "visual_after")}
        rows.append({"method": method, "visual": int(median["visual_after"]), **median})
    baseline = next((row for row in rows if row["method"] == "none"), rows[0])
    for row in rows:
        row["prefill_ratio"] = row["prefill"] / baseline["prefill"]
        row["total_ratio"] = (row["compress"] + row["prefill"]) / (baseline["compress"] + baseline["prefill"])
    return rows


def markdown(rows: list[dict], visual_before: int) -> str:
    lines = [f"| method | visual tokens in the LM (of {visual_before}) | compress s | prefill s | "
             "prefill / none | (compress + prefill) / none |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| `{row['method']}` | {row['visual']} | {row['compress']:.3f} | {row['prefill']:.3f} | "
                     f"{row['prefill_ratio']:.3f} | {row['total_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--side", type=int, default=14, help="tokens per frame side (14 x 14 = 196)")
    args = parser.parse_args()
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = run(args.methods, args.repeats, args.frames, args.side)
    print(f"Qwen2-0.5B-shaped LM, {args.frames} frames x {args.side * args.side} tokens, "
          f"{torch.get_num_threads()} torch threads, median of {args.repeats}, started {start}\n")
    print(markdown(rows, args.frames * args.side * args.side))


if __name__ == "__main__":
    main()
