"""Bi-level routing attention vs dense causal SDPA: prefill time at long contexts.

    python -m eval.bench_attention                 # CPU: PyTorch BRA paths vs dense, 4k/8k/16k
    python -m eval.bench_attention --cuda          # GPU: Triton BRA vs dense, 8k..64k

One causal prefill of random q/k/v (fixed seed, one sequence). Each method runs once to warm
up, then `--repeats` times; the table shows the median seconds and dense/method (>1: faster
than dense). BRA times include routing. `read` is the fraction of the dense causal
query-key pairs that BRA computes.

CPU: dense is SDPA's causal path; `gathered` is the PyTorch BRA that skips unrouted regions,
at `--topk` and at 1/8 of the regions; `mask` is the spec (`bra_reference`), which computes every score and then masks, so it can
only be slower than dense; it runs at the shortest length only (its mask grows as L^2).
`--cuda` times `bra_triton` (top-k = 1/8 of the regions) against SDPA in bfloat16; `routing`
is its routing step alone (`route_regions_triton`). It first checks Triton against
`bra_gathered` in float32, then at each length the autotuned bfloat16 launch against Triton in
float32 (one fixed launch config, the one checked), and prints the config autotuning chose.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.bra import RegionLayout, bra_gathered, bra_reference, route_regions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cuda", action="store_true", help="Triton BRA vs dense SDPA on the GPU")
    parser.add_argument("--lengths", type=int, nargs="+", help="default: 4k 8k 16k; 8k..64k with --cuda")
    parser.add_argument("--heads", type=int, help="query heads (default 8; 32 with --cuda)")
    parser.add_argument("--kv-heads", type=int, help="KV heads (default: as many as query heads; 8 with --cuda)")
    parser.add_argument("--head-dim", type=int, help="default 64; 128 with --cuda")
    parser.add_argument("--block", type=int, default=64, help="tokens per region")
    parser.add_argument("--topk", type=int, default=8, help="routed regions per query region (CPU)")
    parser.add_argument("--sinks", type=int, default=1, help="leading regions every query reads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda:
        bench_cuda(args)
    else:
        bench_cpu(args)


def bench_cpu(args: argparse.Namespace) -> None:
    heads, head_dim = args.heads or 8, args.head_dim or 64
    kv_heads = args.kv_heads or heads
    lengths = args.lengths or [4096, 8192, 16384]
    print(f"# CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, float32, "
          f"H_q={heads}, H_kv={kv_heads}, D={head_dim}, block={args.block}, sinks={args.sinks}, "
          f"{args.repeats} repeats, load average before: {os.getloadavg()[0]:.2f}")
    print("| tokens | method | top-k | read | median s | dense / method |")
    print("|---:|---|---:|---:|---:|---:|")
    for length in lengths:
        query, key, value = random_qkv(1, heads, kv_heads, length, head_dim, args.seed, "cpu", torch.float32)
        layout = RegionLayout.blocks(length, args.block)
        bra = dict(scale=head_dim**-0.5, layout=layout, forced_regions=layout.first_regions(args.sinks))
        eighth = max(1, layout.num_regions // 8)
        runs = {
            ("dense SDPA", 0): lambda: dense(query, key, value, head_dim**-0.5),
            ("BRA gathered", args.topk): lambda: bra_gathered(query, key, value, topk=args.topk, **bra),
            ("BRA gathered", eighth): lambda: bra_gathered(query, key, value, topk=eighth, **bra),
        }
        if length == lengths[0]:
            runs[("BRA mask (spec)", args.topk)] = lambda: bra_reference(query, key, value, topk=args.topk, **bra)
        seconds = median_seconds(runs, args.repeats, sync=None)
        dense_s = seconds[("dense SDPA", 0)]
        for (name, topk), method_s in seconds.items():
            read = read_fraction(query, key, layout, topk, bra["forced_regions"]) if topk else 1.0
            print(f"| {length} | {name} | {topk or '-'} | {read:.3f} | {method_s:.3f} | {dense_s / method_s:.2f} |")


def bench_cuda(args: argparse.Namespace) -> None:
    from kernels.bra_triton import _bra_forward_kernel, bra_triton, route_regions_triton  # needs triton and a GPU

    heads, head_dim = args.heads or 32, args.head_dim or 128
    kv_heads = args.kv_heads or 8
    lengths = args.lengths or [8192, 16384, 32768, 65536]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bfloat16, "
          f"H_q={heads}, H_kv={kv_heads}, D={head_dim}, block={args.block}, sinks={args.sinks}, top-k = regions / 8")

    # Correctness first, at the smallest length: Triton against the PyTorch path in float32.
    query, key, value = random_qkv(1, heads, kv_heads, lengths[0], head_dim, args.seed, "cuda", torch.float32)
    layout = RegionLayout.blocks(lengths[0], args.block, "cuda")
    forced = layout.first_regions(args.sinks)
    check = dict(scale=head_dim**-0.5, topk=layout.num_regions // 8, layout=layout, forced_regions=forced)
    expected = bra_gathered(query, key, value, **check)
    error = float((bra_triton(query, key, value, **check) - expected).abs().max() / expected.abs().max())
    print(f"# check at {lengths[0]} tokens, float32: relative error of Triton vs gathered = {error:.2e}")
    del query, key, value, expected

    print("| tokens | method | top-k | read | median ms | dense / method |")
    print("|---:|---|---:|---:|---:|---:|")
    notes = []
    for length in lengths:
        query, key, value = random_qkv(1, heads, kv_heads, length, head_dim, args.seed, "cuda", torch.bfloat16)
        layout = RegionLayout.blocks(length, args.block, "cuda")
        forced = layout.first_regions(args.sinks)
        topk = max(1, layout.num_regions // 8)
        seconds = median_seconds(
            {
                "dense": lambda: dense(query, key, value, head_dim**-0.5),
                "triton": lambda: bra_triton(
                    query, key, value, scale=head_dim**-0.5, topk=topk, layout=layout, forced_regions=forced
                ),
                "routing": lambda: route_regions_triton(query, key, layout, topk=topk, forced_regions=forced),
            },
            args.repeats,
            sync=torch.cuda.synchronize,
        )
        launch = str(_bra_forward_kernel.best_config)  # chosen by autotuning during the warm-up
        bra = dict(scale=head_dim**-0.5, topk=topk, layout=layout, forced_regions=forced)
        expected = bra_triton(query.float(), key.float(), value.float(), **bra)
        error = float((bra_triton(query, key, value, **bra).float() - expected).abs().max() / expected.abs().max())
        read = read_fraction(query, key, layout, topk, forced)
        dense_ms, triton_ms, routing_ms = (seconds[name] * 1e3 for name in ("dense", "triton", "routing"))
        notes.append(f"# {length} tokens: launch {launch}; bfloat16 vs float32 relative error {error:.2e}")
        print(f"| {length} | dense SDPA | - | 1.000 | {dense_ms:.2f} | 1.00 |")
        print(f"| {length} | BRA Triton (of which routing {routing_ms:.2f} ms) | {topk} | {read:.3f} | "
              f"{triton_ms:.2f} | {dense_ms / triton_ms:.2f} |")
        del query, key, value, expected
    print("\n".join(notes))


def random_qkv(batch, heads, kv_heads, length, head_dim, seed, device, dtype):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(batch, heads, length, head_dim), *[(batch, kv_heads, length, head_dim)] * 2]  # q, k, v
    return [torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for shape in shapes]


def dense(query, key, value, scale):
    return F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=query.shape[1] != key.shape[1]
    )


def median_seconds(runs: dict, repeats: int, sync: Callable[[], None] | None) -> dict:
    """Median wall seconds of each run, after one warm-up round.

    Rounds interleave the runs (dense, then each method, again and again), so that load from
    other processes on a shared machine falls on all of them alike.
    """
    times: dict = {name: [] for name in runs}
    for attempt in range(repeats + 1):
        for name, run in runs.items():
            if sync:
                sync()
            start = time.perf_counter()
            run()
            if sync:
                sync()
            if attempt:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def read_fraction(query, key, layout: RegionLayout, topk: int, forced: torch.Tensor) -> float:
    """Query-key pairs BRA computes, as a fraction of the dense causal ones."""
    routed = route_regions(query, key, layout, topk=topk, forced_regions=forced).cpu()  # [B, H_kv, R, R]
    bounds = torch.tensor(layout.bounds)
    sizes = (bounds[1:] - bounds[:-1]).double()  # [R]; a prefill: every region holds queries
    earlier = routed & ~torch.eye(layout.num_regions, dtype=torch.bool)
    pairs = (earlier.double() @ sizes * sizes).sum(-1) + (sizes * (sizes + 1) / 2).sum()  # [B, H_kv]
    length = layout.length
    return float(pairs.mean() / (length * (length + 1) / 2))


if __name__ == "__main__":
    main()
