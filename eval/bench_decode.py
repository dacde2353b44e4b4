"""Batched decode across sessions (issue 7): N live sessions answer at once through the engine
(no network); their decode steps run as one batch (`EngineConfig.max_decode_batch` 16) or one
session at a time (1), on the same model in the same run.

    python -m eval.bench_decode                                   # prints Markdown
    python -m eval.bench_decode --markdown docs/BENCHMARKS.md     # and records it

Each session holds 4 ShapesWorld frames (64 tokens with the default memory policy); every
session is asked at once and answers `--tokens` new tokens (no stop token, so every answer has
the same length). Reported: wall time from the questions to the last answer, answer tokens per
second over all sessions, the mean decode batch (steps / forward passes) and the ratio of the
two modes' throughputs. The LMs are random-init vidsieve-tiny models whose language model is
resized (`--lm HIDDENxLAYERS`): the shipped 128x4 and a wider one where a decode step reads
more weight (what batching amortises).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

from eval import shapesworld as sw
from eval.bench_stream import replace_section

SECTION = "## Batched decode across sessions (issue 7)"


def model_with_lm(hidden: int, layers: int):
    """vidsieve-tiny with its LM resized: `hidden` wide (heads of 64, 2 KV heads for 4 or more
    heads), an FFN of 3 x hidden, `layers` deep; random init."""
    from vlm.model import VLM, VLMConfig

    config = VLMConfig.from_name("vidsieve-tiny")
    heads = max(2, hidden // 64)
    config.lm.update(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=2 if heads >= 4 else heads)
    return VLM.from_config(config, seed=0).eval()


def answer_together(model, sessions: int, new_tokens: int, max_decode_batch: int) -> dict:
    """N sessions, 4 frames each, asked at once; returns timing and batching of their answers."""
    from streaming.engine import Engine, EngineConfig
    from streaming.session import AnswerDone, Question, SamplingParams, Session, SessionConfig

    frames = sw.render(sw.scene_and_questions("test", 0)[0])[:4]
    done: list[AnswerDone] = []
    finished = threading.Event()

    def emit(event):
        if isinstance(event, AnswerDone):
            done.append(event)
            if len(done) == sessions:
                finished.set()

    engine = Engine(model, EngineConfig(max_sessions=sessions, max_decode_batch=max_decode_batch)).start()
    try:
        jobs = [engine.admit(Session(model, SessionConfig(fps=None), emit, session_id=f"s{i}"))
                for i in range(sessions)]
        for job in jobs:
            for index, frame in enumerate(frames):
                job.push_frame(index / 8, lambda frame=frame: frame)
        engine.notify()
        while any(job.pending() for job in jobs):
            time.sleep(0.005)
        before = engine.stats()
        sampling = SamplingParams(max_new_tokens=new_tokens)  # no stop token: every answer is full length
        started = time.perf_counter()
        for i, job in enumerate(jobs):
            job.ask(Question(f"q{i}", "What colour is the circle?", sampling))
        engine.notify()
        if not finished.wait(600):
            raise TimeoutError(f"{sessions} answers did not finish in 600 s")
        seconds = time.perf_counter() - started
        after = engine.stats()
    finally:
        engine.shutdown()
    tokens = sum(event.usage.completion_tokens for event in done)
    steps, passes = after.decode_steps - before.decode_steps, after.decode_passes - before.decode_passes
    return {"sessions": sessions, "max_decode_batch": max_decode_batch, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "mean_batch": steps / max(1, passes),
            "texts": sorted(event.text for event in done)}


def markdown(command: str, rows: list[dict], new_tokens: int) -> str:
    lines = [SECTION, "",
             f"- Command: `{command}`",
             f"- Machine: {os.cpu_count()}-core CPU, no GPU, torch {torch.__version__}, "
             f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}; "
             f"run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             f"- N sessions of 4 frames each are asked at once and each answers {new_tokens} tokens; one model "
             "thread. Batched: `max_decode_batch` 16 (the default); alone: 1 (each step its own forward pass, "
             "sessions interleaved round-robin). Same answers in both modes (checked by the command).", "",
             "| LM (hidden x layers) | sessions | alone: tokens/s | batched: tokens/s | mean batch | speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['lm']} | {row['sessions']} | {row['alone']['tokens_per_s']:.0f} | "
                     f"{row['batched']['tokens_per_s']:.0f} | {row['batched']['mean_batch']:.1f} | "
                     f"{row['batched']['tokens_per_s'] / row['alone']['tokens_per_s']:.2f}x |")
    lines += ["", "Tokens/s include each question's prefill. A decode step reads every weight once, whatever "
              "the batch, so the more sessions share it the more it saves; attention stays per sequence "
              "(each session's own KV), which is small next to the weights at these lengths."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", nargs="*", default=["128x4", "1024x8"], help="LM sizes, HIDDENxLAYERS")
    parser.add_argument("--sessions", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per answer")
    parser.add_argument("--markdown", type=Path, default=None, help="replace this benchmark's section in this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for size in args.lm:
        hidden, layers = (int(part) for part in size.lower().split("x"))
        model = model_with_lm(hidden, layers)
        for sessions in args.sessions:
            row = {"lm": size, "sessions": sessions}
            for mode, batch in (("alone", 1), ("batched", 16)):
                row[mode] = answer_together(model, sessions, args.tokens, batch)
            if row["alone"]["texts"] != row["batched"]["texts"]:
                raise AssertionError(f"batched answers differ from answers decoded alone ({size}, {sessions} sessions)")
            rows.append(row)
            print(f"{size} x {sessions}: alone {row['alone']['tokens_per_s']:.0f} tok/s, batched "
                  f"{row['batched']['tokens_per_s']:.0f} tok/s (mean batch {row['batched']['mean_batch']:.1f})",
                  flush=True)
    command = "python -m eval.bench_decode " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(command.strip(), rows, args.tokens)
    print(section)
    if args.markdown:
        replace_section(args.markdown, section)


if __name__ == "__main__":
    main()
