"""The `vidsieve` command line: every front door that speaks argv.

Exit codes: 0 success, 2 usage error (bad flags, bad spec, unknown model), 3 a job that
finished with some error records.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from compressors import list_compressors, parse_spec
from kernels.errors import VidsieveError

EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED = 0, 2, 3
DEFAULT_MODEL = "vidsieve-tiny"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except VidsieveError as error:
        print(f"vidsieve: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidsieve", description="Video-language models on a token budget.")
    commands = parser.add_subparsers(dest="command", required=True)

    annotate = commands.add_parser("annotate", help="answer questions about videos, one JSON line per answer")
    annotate.add_argument("videos", nargs="+", type=Path, help="video files")
    annotate.add_argument("--question", "-q", action="append", required=True, help="repeat for several")
    annotate.add_argument("--out", "-o", type=Path, required=True, help="output JSONL (appended, resumable)")
    annotate.add_argument("--overwrite", action="store_true", help="start a fresh output file")
    annotate.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_model_arguments(annotate)
    add_sampling_plan_arguments(annotate)
    annotate.set_defaults(handler=run_annotate)

    listing = commands.add_parser("compressors", help="list registered compressors and their parameters")
    listing.set_defaults(handler=run_compressors)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="folder, preset or hub id (default: %(default)s)")
    parser.add_argument("--compressor", default="none", help="spec such as 'random:ratio=0.25' (see `vidsieve compressors`)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when available)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=32)


def add_sampling_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fps", type=float, default=None, help="sample this many frames per second")
    parser.add_argument("--num-frames", type=int, default=None, help="frames uniform over the clip (default: what the model was trained on)")
    parser.add_argument("--max-frames", type=int, default=None, help="cap on frames per video")
    parser.add_argument("--start", dest="start_s", type=float, default=None, help="seconds")
    parser.add_argument("--end", dest="end_s", type=float, default=None, help="seconds")


def run_annotate(args: argparse.Namespace) -> int:
    from server.annotate import AnnotateJob, run_annotation
    from streaming import SamplingPlan
    from vlm.model import VLM

    spec = parse_spec(args.compressor)  # fail fast on bad input, before loading anything
    plan = SamplingPlan(fps=args.fps, num_frames=args.num_frames, max_frames=args.max_frames,
                        start_s=args.start_s, end_s=args.end_s)
    model = VLM.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    if plan.fps is None and plan.num_frames is None:  # the clip length the model was trained on
        plan = dataclasses.replace(plan, num_frames=model.config.num_frames)
    if not model.config.trained:
        print(f"vidsieve: warning: {model.display_name}: answers are not meaningful", file=sys.stderr)
    job = AnnotateJob(videos=args.videos, questions=args.question, out=args.out, spec=spec, plan=plan,
                      max_new_tokens=args.max_new_tokens, overwrite=args.overwrite)
    summary = run_annotation(model, job, progress=not args.no_progress)
    print(f"annotate: {summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped "
          f"in {summary.elapsed_s:.1f}s ({summary.videos_per_s:.2f} videos/s) -> {args.out}", file=sys.stderr)
    return EXIT_SOME_FAILED if summary.failed else EXIT_OK


def run_compressors(args: argparse.Namespace) -> int:
    for info in list_compressors():
        aliases = f" (alias: {', '.join(info.aliases)})" if info.aliases else ""
        print(f"{info.name}{aliases}  [{info.stage}{', trainable' if info.trainable else ''}]")
        print(f"    {info.summary}")
        for param in info.params:
            print(f"    {param.name}: {param.type} = {param.default!r}  {param.help}")
    print("Every compressor also takes one budget: ratio=R (0<R<=1), tokens=N, or per_frame=N.")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
