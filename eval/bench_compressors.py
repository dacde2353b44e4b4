"""Every compressor at budgets 50%, 25%, 10% and one token per frame on ShapesWorld.

    python -m eval.bench_compressors --count 60 --out docs/compressors

One run: each clip is decoded and encoded once and every spec answers every question from
the same visual tokens (`eval.accuracy.run_accuracy`), so accuracy and prefill time (as a
ratio to `none`) are comparable. Writes `<out>.json`, `<out>.md` (the table) and `<out>.png`
(accuracy against the fraction of visual tokens kept).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from compressors import list_compressors, parse_spec
from eval.accuracy import load_manifest, markdown_table, run_accuracy, summarise
from eval.shapesworld import cached_split
from streaming import SamplingPlan, open_video
from vlm.model import VLM

RATIOS = (0.5, 0.25, 0.1)


def specs_for(name: str) -> list[str]:
    """The specs that put `name` at each budget it can meet."""
    if name == "none":
        return ["none"]
    if name == "avgpool":  # a 4x4 token grid per frame: factor 2 keeps 25%, factor 4 one token
        return ["avgpool:factor=2", "avgpool:factor=4"]
    if name == "videoscan":  # one carrier per frame, by construction
        return ["videoscan"]
    if name == "corematching":  # also its own elbow cut, the paper's rule
        return ["corematching"] + [f"{name}:ratio={ratio}" for ratio in RATIOS] + [f"{name}:per_frame=1"]
    return [f"{name}:ratio={ratio}" for ratio in RATIOS] + [f"{name}:per_frame=1"]


def corematching_ffn(model: VLM, items: list, spec_text: str, questions: int = 40) -> dict:
    """What CoreMatching leaves of the LM's FFN work, over the first `questions` items: the decode
    FFN's multiply-adds per token as a fraction of the dense FFN's (mean over layers), and the
    visual tokens left after its in-LM pruning."""
    spec = parse_spec(spec_text)
    fractions, kept, before = [], [], []
    for item in items[:questions]:
        clip = open_video(item.video, SamplingPlan(num_frames=model.config.num_frames)).read_all()
        tokens = model.encode_frames(np.stack([f.rgb for f in clip]), [f.timestamp_s for f in clip])
        prompt = model.prepare(tokens, item.question, spec)
        with torch.no_grad():
            state, _ = model.runner.prefill(prompt.embeds, prompt.positions, is_visual=prompt.is_visual,
                                            frame_index=prompt.frame_index, hook=prompt.hook)
        fractions += [ffn.flop_fraction for ffn in state.ffn_slices.values()]
        kept.append(int(state.is_visual.sum()))
        before.append(len(tokens))
    return {"spec": spec_text, "questions": len(kept),
            "decode_ffn_flop_fraction": round(float(np.mean(fractions)), 4),
            "visual_tokens_before": round(float(np.mean(before)), 1),
            "visual_tokens_after_pruning": round(float(np.mean(kept)), 1)}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[tuple[float, float]]] = {}
    for spec, entry in summary.items():
        kept = entry["visual_tokens_kept"] / entry["visual_tokens_before"]
        by_method.setdefault(spec.split(":")[0], []).append((kept, 100 * entry["overall"]))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours, markers = plt.get_cmap("tab20").colors, "os^Dv<>ph*"
    for i, (method, points) in enumerate(sorted(by_method.items())):  # a colour and a marker each
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker=markers[i % len(markers)],
                  color=colours[(2 * i) % 20 + (2 * i) // 20 % 2], label=method)
    first = next(iter(summary.values()))
    axes.axhline(100 * first["chance"], color="grey", linestyle=":", label="chance")
    axes.set_xscale("log")
    axes.set_xlabel("fraction of visual tokens kept (log)")
    axes.set_ylabel("ShapesWorld test accuracy (%)")
    axes.legend(fontsize=8, ncol=2)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_compressors", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vidsieve-tiny")
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=60, help="clips")
    parser.add_argument("--data-dir", type=Path, default=Path("runs/shapesworld"))
    parser.add_argument("--out", type=Path, default=Path("docs/compressors"))
    parser.add_argument("--only", nargs="*", default=None, help="compressor names (default: all registered)")
    parser.add_argument("--ffn-questions", type=int, default=40, help="questions for CoreMatching's FFN report")
    args = parser.parse_args(argv)
    items = load_manifest(cached_split(args.split, args.count, args.data_dir))
    names = args.only or [info.name for info in list_compressors()]
    specs = [spec for name in ["none", *[n for n in names if n != "none"]] for spec in specs_for(name)]
    model = VLM.from_pretrained(args.model, device="cpu")
    summary = summarise(run_accuracy(model, items, specs, max_new_tokens=4))
    table = markdown_table(summary)
    ffn = [corematching_ffn(model, items, spec, args.ffn_questions)
           for spec in specs if spec.startswith("corematching")]
    for entry in ffn:
        table += (f"\n\n`{entry['spec']}` ({entry['questions']} questions): decode FFN at "
                  f"{100 * entry['decode_ffn_flop_fraction']:.0f}% of the dense FFN's multiply-adds "
                  f"({1 / entry['decode_ffn_flop_fraction']:.1f}x fewer); visual tokens "
                  f"{entry['visual_tokens_before']:g} -> {entry['visual_tokens_after_pruning']:g} after its pruning.")
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"model": model.display_name, "results": summary, "corematching_ffn": ffn}, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")
    plot(summary, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
