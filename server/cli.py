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
    annotate.add_argument("videos", nargs="*", help="video files, folders (searched recursively) or glob patterns")
    annotate.add_argument("--manifest", "-m", action="append", type=Path, default=[],
                          help="JSONL, CSV or JSON list of {video, question(s)} rows; repeat for several")
    annotate.add_argument("--question", "-q", action="append", default=[],
                          help="asked of every video without its own question; repeat for several")
    annotate.add_argument("--out", "-o", type=Path, required=True,
                          help="output JSONL: appended, one record per answer, resumable")
    annotate.add_argument("--retry-failed", action="store_true",
                          help="redo error records (a plain rerun skips ok and error records alike)")
    annotate.add_argument("--overwrite", action="store_true", help="start a fresh output file")
    annotate.add_argument("--workers", type=int, default=2,
                          help="local engine: decode processes beside the model (0: none; default %(default)s)")
    annotate.add_argument("--threads", type=int, default=None,
                          help="torch CPU threads for the model (default: the cores the workers leave free)")
    annotate.add_argument("--engine", choices=("local", "ray"), default="local",
                          help="local processes, or Ray Data on a cluster (pip install vidsieve[ray])")
    annotate.add_argument("--ray-address", default=None,
                          help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    annotate.add_argument("--ray-actors", type=int, default=None,
                          help="model replicas on Ray (default: one per GPU in the cluster, else 1)")
    annotate.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_model_arguments(annotate)
    add_sampling_plan_arguments(annotate)
    annotate.set_defaults(handler=run_annotate)

    train = commands.add_parser("train", help="train vidsieve-tiny, or a learned compressor on top of it, on ShapesWorld")
    trains = train.add_subparsers(dest="what", required=True)
    compressor = trains.add_parser("compressor", help="a learned compressor (hicom, quecc) on the frozen model")
    compressor.add_argument("name", help="the compressor to train")
    compressor.add_argument("--model", default=DEFAULT_MODEL, help="folder of the frozen model (weights saved beside it)")
    compressor.add_argument("--minutes", type=float, help="wall-time length (default 30; with --steps: a cap, default none)")
    compressor.add_argument("--steps", type=int, help="train this many steps, whatever the machine's speed")
    compressor.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    compressor.set_defaults(handler=run_train_compressor)
    tiny = trains.add_parser("tiny", help="vidsieve-tiny from scratch")
    tiny.add_argument("--out", type=Path, required=True, help="folder to save the model into")
    # Unset step counts take the recipe's (eval.train_tiny.TrainConfig), the documented run.
    tiny.add_argument("--perception-steps", type=int, help="default: the recipe's")
    tiny.add_argument("--qa-steps", type=int, help="default: the recipe's")
    tiny.add_argument("--qa-pool-clips", type=int,
                      help="training clips encoded once by the frozen tower and revisited for QA (default: the recipe's)")
    tiny.add_argument("--eval-every", type=int, help="QA steps between validation passes and checkpoints")
    tiny.add_argument("--perception-from", help="reuse the tower of a model folder trained by this recipe's stage 1")
    tiny.add_argument("--robust-steps", type=int,
                      help="stage 3: QA steps with heavy token dropping after stage 2 (default 1500, run AA; 0: off)")
    tiny.add_argument("--robust-lr", type=nonnegative_float, help="stage 3's peak learning rate (default: the recipe's)")
    tiny.add_argument("--qa-from", help="start from a model folder trained by this recipe's stages 1-2: run stage 3 only")
    tiny.add_argument("--moment-counts", action=argparse.BooleanOptionalAction, default=None,
                      help="stage 2's training clips also count at the start or end (default: on; docs/TRAINING.md)")
    tiny.add_argument("--identity-weight", type=float,
                      help="stage 3: weight on the identity head (which earlier kept tokens show the same object; 0: off)")
    tiny.add_argument("--curriculum", type=parse_curriculum,
                      help="QA steps on clips cut to a few frames before whole clips, as STEPS:FRAMES,... "
                           "(default: the recipe's; 'none' for whole clips from the start)")
    tiny.add_argument("--look-weight", type=nonnegative_float, default=0.0,
                      help="also supervise the first-look / last-look heads at this weight (default: off; "
                           "see docs/TRAINING.md)")
    tiny.add_argument("--query-weight", type=nonnegative_float,
                      help="supervise the naming head (layer 0, the question's words that name its objects) "
                           "at this weight (default: the recipe's, 1)")
    tiny.add_argument("--readout-weight", type=nonnegative_float,
                      help="teach a linear readout of the object head's output the facts of the object it "
                           "found (colour, shape, size, dot, direction, quadrant) at this weight "
                           "(default: the recipe's, 1; 0: off)")
    tiny.add_argument("--count-weight", type=nonnegative_float,
                      help="teach the count head (a sink and one token per counted object) at this weight "
                           "(default: the recipe's, 1; 0: off)")
    tiny.add_argument("--place-scale", type=nonnegative_float,
                      help="amplitude of the projector's row/column embeddings (default: the preset's, 0.25)")
    tiny.add_argument("--time-scale", type=nonnegative_float,
                      help="amplitude of the projector's frame embeddings (default: the preset's, 0.25)")
    tiny.add_argument("--pool-cache",
                      help="keep encoded QA clip pools in this folder and reuse them when the tower and clips match")
    tiny.add_argument("--device", default="cpu", help="cpu or cuda: the same steps give the same recipe")
    tiny.add_argument("--workers", type=int, default=1, help="clip-rendering processes (0: none)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    tiny.set_defaults(handler=run_train)

    bench = commands.add_parser("bench", help="benchmarks (accuracy, ...)")
    benches = bench.add_subparsers(dest="bench", required=True)
    accuracy = benches.add_parser("accuracy", help="accuracy per question type for model x compressor specs")
    source = accuracy.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="a manifest file or MVBench task folder")
    source.add_argument("--split", help="a ShapesWorld split (train, val, test, compositional), written on first use")
    accuracy.add_argument("--count", type=int, default=200, help="clips of --split (default %(default)s)")
    accuracy.add_argument("--data-dir", type=Path, default=Path("runs/shapesworld"), help="where --split is written")
    accuracy.add_argument("--format", default="auto", help="shapesworld, mvbench, videomme (default: detect)")
    accuracy.add_argument("--videos", type=Path, default=None, help="video folder (default: the manifest's)")
    accuracy.add_argument("--with-options", action="store_true", help="list lettered options in the prompt")
    accuracy.add_argument("--limit", type=int, default=None, help="first N questions only")
    accuracy.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    accuracy.add_argument("--markdown", type=Path, default=None, help="write the Markdown table here")
    add_model_arguments(accuracy, repeat_compressor=True)
    add_sampling_plan_arguments(accuracy)
    accuracy.set_defaults(handler=run_bench_accuracy)

    serve = commands.add_parser("serve", help="WebSocket streaming and OpenAI-compatible HTTP server "
                                "(settings: VIDSIEVE_* environment variables; pip install vidsieve[server])")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", default=None, help="folder, preset or hub id (default: VIDSIEVE_MODEL, else vidsieve-tiny)")
    serve.add_argument("--device", default=None)
    serve.add_argument("--dtype", default=None)
    serve.add_argument("--attention", default=None, help="default attention spec (default: dense)")
    serve.add_argument("--media-root", type=Path, default=None, help="local media paths are allowed under this folder only")
    serve.set_defaults(handler=run_serve)

    demo = commands.add_parser("demo", help="Gradio demo on 127.0.0.1: ask a video anything and see which tokens "
                               "each compressor kept (pip install vidsieve[demo])")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--model", default=DEFAULT_MODEL, help="the model chosen at start (default: %(default)s)")
    demo.set_defaults(handler=run_demo)

    listing = commands.add_parser("compressors", help="list registered compressors and their parameters")
    listing.set_defaults(handler=run_compressors)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, *, repeat_compressor: bool = False) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="folder, preset or hub id (default: %(default)s)")
    if repeat_compressor:
        parser.add_argument("--compressor", action="append", help="spec; repeat to compare several (default: none)")
    else:
        parser.add_argument("--compressor", default="none",
                            help="spec such as 'random:ratio=0.25' (see `vidsieve compressors`)")
    parser.add_argument("--attention", default="dense",
                        help="dense (default) or bi-level routing attention, e.g. 'bra:topk=8,block=64'")
    parser.add_argument("--reuse", default="none", type=parse_reuse,
                        help="none (default), kv (one video prefill for every question), "
                             "patches[:threshold=T,refresh=N] (re-encode only changed patches), or kv+patches")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when available)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=32)


def parse_reuse(text: str):
    from vlm.reuse import ReuseSpec, ReuseSpecError

    try:
        return ReuseSpec.parse(text)
    except ReuseSpecError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_sampling_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fps", type=float, default=None, help="sample this many frames per second")
    parser.add_argument("--num-frames", type=int, default=None, help="frames uniform over the clip (default: what the model was trained on)")
    parser.add_argument("--max-frames", type=int, default=None, help="cap on frames per video")
    parser.add_argument("--start", dest="start_s", type=float, default=None, help="seconds")
    parser.add_argument("--end", dest="end_s", type=float, default=None, help="seconds")


def run_annotate(args: argparse.Namespace) -> int:
    from server.annotate import AnnotateJob, run_annotation
    from server.annotate_work import collect_work
    from streaming import SamplingPlan
    from vlm.model import VLM

    # fail fast on bad input, before loading anything
    if args.workers < 0 or any(count is not None and count < 1 for count in (args.threads, args.ray_actors)):
        raise VidsieveError("--workers must be 0 or more, --threads and --ray-actors 1 or more")
    spec = parse_spec(args.compressor)
    plan = SamplingPlan(fps=args.fps, num_frames=args.num_frames, max_frames=args.max_frames,
                        start_s=args.start_s, end_s=args.end_s)
    items = collect_work(args.videos, args.manifest, args.question)
    if args.engine == "ray":
        from server.annotate_ray import import_ray

        import_ray()
    # On Ray the actors load the model; the driver needs only its name and frame count.
    model = VLM.from_pretrained(args.model, device="cpu" if args.engine == "ray" else args.device, dtype=args.dtype,
                                attention=args.attention)
    if plan.fps is None and plan.num_frames is None:  # the clip length the model was trained on
        plan = dataclasses.replace(plan, num_frames=model.config.num_frames)
    if not model.config.trained:
        print(f"vidsieve: warning: {model.display_name}: answers are not meaningful", file=sys.stderr)
    job = AnnotateJob(items=items, out=args.out, spec=spec, plan=plan, max_new_tokens=args.max_new_tokens,
                      overwrite=args.overwrite, retry_failed=args.retry_failed, reuse=args.reuse)
    try:
        if args.engine == "ray":
            from server.annotate_ray import run_annotation_on_ray

            summary = run_annotation_on_ray(job, model, model_source=args.model,
                                            device=args.device, dtype=args.dtype, address=args.ray_address,
                                            actors=args.ray_actors, progress=not args.no_progress)
        else:
            summary = run_annotation(model, job, workers=args.workers, threads=args.threads,
                                     progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"annotate: interrupted; every record in {args.out} is whole: rerun the same command to finish",
              file=sys.stderr)
        return 130  # what a shell reports for Ctrl-C
    print(f"annotate: {summary.describe()} -> {args.out}", file=sys.stderr)
    return EXIT_SOME_FAILED if summary.has_errors else EXIT_OK


def parse_curriculum(text: str) -> tuple[tuple[int, int], ...]:
    """'1500:1,500:2' -> ((1500, 1), (500, 2)); 'none' -> ()."""
    if text.strip().lower() == "none":
        return ()
    try:
        stages = tuple(tuple(int(part) for part in stage.split(":")) for stage in text.split(","))
    except ValueError:
        stages = ((),)
    if not all(len(stage) == 2 and min(stage) > 0 for stage in stages):
        raise argparse.ArgumentTypeError(f"--curriculum must be STEPS:FRAMES,... with positive integers; got {text!r}")
    return stages


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def train_config(args: argparse.Namespace):
    """The TrainConfig of `vidsieve train tiny`'s flags; an unset flag keeps the recipe's value."""
    from eval.train_tiny import TrainConfig

    chosen = {name: getattr(args, name)
              for name in ("perception_steps", "qa_steps", "qa_pool_clips", "eval_every", "curriculum",
                           "query_weight", "readout_weight", "count_weight", "pool_cache", "place_scale", "time_scale",
                           "robust_steps", "robust_lr", "identity_weight", "moment_counts")}
    if args.look_weight > 0 and chosen["count_weight"] is None:
        chosen["count_weight"] = 0.0  # the look heads are the count head's heads (eval.train_tiny.COUNT_HEAD)
    return TrainConfig(**{name: value for name, value in chosen.items() if value is not None},
                       device=args.device, workers=args.workers, seed=args.seed, look_weight=args.look_weight,
                       perception_from=args.perception_from, qa_from=args.qa_from)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from eval.train_tiny import train_tiny

    if args.threads:
        torch.set_num_threads(args.threads)
    train_tiny(args.out, train_config(args), report=lambda line: print(line, flush=True))
    return EXIT_OK


def run_train_compressor(args: argparse.Namespace) -> int:
    import torch

    from eval.train_compressor import CompressorTrainConfig, train_compressor
    from vlm.model import VLM

    if args.steps is not None and args.steps < 1:
        raise VidsieveError(f"--steps must be at least 1, got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = parse_spec(args.name)
    if not spec.compressor.trainable:
        raise VidsieveError(f"compressor {spec.name!r} has no weights to train; trainable: "
                            + ", ".join(info.name for info in list_compressors() if info.trainable))
    model = VLM.from_pretrained(args.model, device="cpu")
    if model.folder is None:
        raise VidsieveError(f"{args.model!r} has no folder to save compressor weights beside; train or save it first")
    minutes = args.minutes or (30.0 if args.steps is None else float("inf"))
    train_compressor(model, spec.name, minutes, config=CompressorTrainConfig(max_steps=args.steps),
                     report=lambda line: print(line, flush=True))
    return EXIT_OK


def run_bench_accuracy(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from eval.accuracy import load_manifest, markdown_table, run_accuracy, summarise
    from streaming import SamplingPlan
    from vlm.model import VLM

    specs = [parse_spec(text).text for text in (args.compressor or ["none"])]
    if args.split:
        from eval.shapesworld import cached_split

        manifest = cached_split(args.split, args.count, args.data_dir)
    else:
        manifest = args.manifest
    items = load_manifest(manifest, args.format, args.videos)[: args.limit]
    model = VLM.from_pretrained(args.model, device=args.device, dtype=args.dtype, attention=args.attention)
    plan = SamplingPlan(fps=args.fps, num_frames=args.num_frames or (None if args.fps else model.config.num_frames),
                        max_frames=args.max_frames, start_s=args.start_s, end_s=args.end_s)
    with tqdm(total=len(items), desc="bench accuracy", unit="question", file=sys.stderr) as bar:
        results = run_accuracy(model, items, specs, plan=plan, with_options=args.with_options,
                               max_new_tokens=args.max_new_tokens, reuse=args.reuse, progress=bar)
    summary = summarise(results)
    table = markdown_table(summary)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": model.display_name, "manifest": str(manifest),
                                        "results": summary}, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    return EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    try:
        from pydantic import ValidationError

        from server.app import run_server
        from server.settings import Settings
    except ImportError as error:
        raise VidsieveError(f"serve needs the server extra ({error.name} is missing): pip install vidsieve[server]") from None
    overrides = {"model": args.model, "device": args.device, "dtype": args.dtype, "attention": args.attention,
                 "media_root": args.media_root}
    try:
        settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as error:
        raise VidsieveError(f"bad server settings: {error}") from None
    run_server(settings, args.host, args.port)
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    from server.demo import launch_demo

    launch_demo(port=args.port, model=args.model)
    return EXIT_OK


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
