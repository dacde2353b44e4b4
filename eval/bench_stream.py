"""Streaming benchmarks (issue 7): bounded memory over a long stream, and time to first token
with N concurrent sessions over loopback.

    python -m eval.bench_stream                      # both parts, prints Markdown
    python -m eval.bench_stream --frames 10000 --sessions 1 4 16 --markdown docs/BENCHMARKS.md

Part 1 feeds ONE session (the engine's model thread, no network) `--frames` frames cycling
through ShapesWorld clips, every frame kept (fps null), default memory policy (64 carriers,
a 4-frame window), and reports process RSS, KV bytes held and KV slots at frame 100 and at
the end, plus the time to first token of a question asked at both points.

Part 2 starts the real server on 127.0.0.1 and runs N WebSocket clients at once; each streams
clips in real time (8 fps wall clock; the session keeps 2 fps) and asks one question mid-clip
and one at its end. Time to first token is measured by the client (question sent -> first
answer event) and reported by the server (`usage.time_to_first_token_s`); errors must be 0.

Without `--model`, the model is vidsieve-tiny: the trained weights when shipped, else a
random init with its LM weights scaled x4 (as the tests use) so answers have real tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import platform
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval import shapesworld as sw

CLIP_FPS = 8
SECTION = "## Streaming (issue 7)"


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def clips(count: int) -> list[tuple[np.ndarray, str]]:
    """(frames [16, 128, 128, 3], a question) of `count` test clips."""
    out = []
    for index in range(count):
        scene, questions = sw.scene_and_questions("test", index)
        out.append((sw.render(scene), questions[0].text))
    return out


def load_model(name: str | None):
    from vlm.model import EMBEDDED_WEIGHTS, VLM, VLMConfig

    if name is not None or (EMBEDDED_WEIGHTS / "vidsieve-tiny" / "model.safetensors").exists():
        return VLM.from_pretrained(name or "vidsieve-tiny", device="cpu"), name or "vidsieve-tiny (trained)"
    model = VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=0)
    with torch.no_grad():
        for parameter in model.lm.parameters():
            parameter.mul_(4.0)
    return model, "vidsieve-tiny random init, LM weights x4"


# --- part 1: one long session -------------------------------------------------------------------


def long_session(model, frames_total: int, max_seconds: float) -> dict:
    from streaming.engine import Engine, EngineConfig
    from streaming.session import AnswerDone, Question, Session, SessionConfig

    done: list[AnswerDone] = []
    arrived = threading.Event()

    def emit(event):
        if isinstance(event, AnswerDone):
            done.append(event)
            arrived.set()

    engine = Engine(model, EngineConfig(max_sessions=1)).start()
    session = engine.admit(Session(model, SessionConfig(fps=None), emit, session_id="long"))
    material = clips(8)
    samples, started = {}, time.perf_counter()

    def measure(label: int) -> None:
        while session.pending():
            time.sleep(0.005)
        arrived.clear()
        session.ask(Question(f"at-{label}", material[0][1], model.default_sampling(8)))
        engine.notify()
        arrived.wait(120)
        gc.collect()
        samples[label] = {"rss_bytes": rss_bytes(), "kv_bytes": session.state.nbytes(),
                          "kv_allocated_bytes": session.state.allocated_bytes(), "kv_slots": session.state.length,
                          "visual_slots": int(session.state.is_visual.sum()),
                          "ttft_s": done[-1].usage.time_to_first_token_s,
                          "elapsed_s": time.perf_counter() - started}

    fed = 0
    try:
        for fed in range(1, frames_total + 1):
            frames, _ = material[(fed - 1) // 16 % len(material)]
            frame = frames[(fed - 1) % 16]
            while session.pending() >= 32:
                time.sleep(0.002)
            session.push_frame((fed - 1) / CLIP_FPS, lambda frame=frame: frame)
            engine.notify()
            if fed in (100, 1000) or fed % 2500 == 0:
                measure(fed)
            if time.perf_counter() - started > max_seconds:
                break
        if fed not in samples:
            measure(fed)
    finally:
        engine.shutdown()
    return {"frames": fed, "seconds": time.perf_counter() - started, "samples": samples}


# --- part 2: N concurrent sessions over loopback -------------------------------------------------


async def run_client(url: str, headers: dict, rounds: int, material, ttfts: list, server_ttfts: list, errors: list):
    import websockets

    try:
        async with websockets.connect(url, additional_headers=headers, max_size=None, open_timeout=60) as ws:
            await ws.send(json.dumps({"type": "session.start", "fps": 2.0}))
            started = json.loads(await ws.recv())
            if started["type"] != "session.started":
                errors.append(started)
                return
            clock = 0
            for round_index in range(rounds):
                frames, question = material[round_index % len(material)]
                for index, frame in enumerate(frames):
                    buffer = io.BytesIO()
                    Image.fromarray(frame).save(buffer, format="PNG")
                    await ws.send(struct.pack("<4sd", b"VSF1", clock / CLIP_FPS) + buffer.getvalue())
                    clock += 1
                    await asyncio.sleep(1 / CLIP_FPS)
                    if index in (7, 15):
                        question_id = f"r{round_index}-{index}"
                        asked = time.perf_counter()
                        await ws.send(json.dumps({"type": "question", "id": question_id, "text": question,
                                                  "max_new_tokens": 8}))
                        first = None
                        while True:
                            event = json.loads(await asyncio.wait_for(ws.recv(), 120))
                            if event["type"] == "error":
                                errors.append(event)
                                break
                            first = first or time.perf_counter() - asked
                            if event["type"] == "answer.done":
                                ttfts.append(first)
                                server_ttfts.append(event["usage"]["time_to_first_token_s"])
                                break
    except Exception as error:  # any failure of a client counts as an error
        errors.append(repr(error))


def concurrent_sessions(model_folder: Path, counts: list[int], max_seconds: float) -> list[dict]:
    from server.app import DrainingServer, create_app, uvicorn_config
    from server.settings import Settings

    settings = Settings(model=str(model_folder), device="cpu", api_key="bench", max_sessions=max(counts),
                        idle_timeout_s=600)
    port = _free_port()
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings, "127.0.0.1", port), app, settings.drain_timeout_s)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    material = clips(4)
    results = []
    try:
        for count in counts:
            rounds = max(1, 16 // count)
            ttfts, server_ttfts, errors = [], [], []

            async def everyone():
                await asyncio.wait_for(asyncio.gather(*(
                    run_client(f"ws://127.0.0.1:{port}/v1/stream", {"Authorization": "Bearer bench"}, rounds, material,
                               ttfts, server_ttfts, errors) for _ in range(count))), max_seconds)

            started = time.perf_counter()
            try:
                asyncio.run(everyone())
            except asyncio.TimeoutError:
                errors.append(f"did not finish in {max_seconds} s")
            results.append({"sessions": count, "questions": len(ttfts), "errors": len(errors),
                            "error_samples": errors[:3], "seconds": time.perf_counter() - started,
                            "ttft_p50_s": _percentile(ttfts, 50), "ttft_p95_s": _percentile(ttfts, 95),
                            "server_ttft_p50_s": _percentile(server_ttfts, 50),
                            "server_ttft_p95_s": _percentile(server_ttfts, 95)})
            print(json.dumps(results[-1]), flush=True)
    finally:
        server.should_exit = True
        thread.join(30)
    return results


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.array(values), q)) if len(values) > 1 else values[0]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- report ------------------------------------------------------------------------------------------


def markdown(command: str, model_name: str, long: dict | None, concurrent: list[dict] | None) -> str:
    lines = [SECTION, "",
             f"- Command: `{command}`",
             f"- Machine: {os.cpu_count()}-core CPU, no GPU, torch {torch.__version__}, "
             f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}; "
             f"run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, other jobs sharing the cores.",
             f"- Model: {model_name}. Default memory policy: 64 VideoScan carriers + a 4-frame window "
             f"(16 tokens a frame), compressor none.", ""]
    if long:
        samples = long["samples"]
        first, last = samples[min(samples)], samples[max(samples)]
        lines += [f"One session fed {long['frames']} frames (every frame kept) through the engine in "
                  f"{long['seconds']:.0f} s ({long['seconds'] / long['frames'] * 1000:.1f} ms a frame: encode, "
                  f"prefill, evict). A question asked at each point; KV = keys and values held.", "",
                  "| frames | RSS MiB | KV bytes | KV allocated bytes | KV slots | visual slots | TTFT s |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for frames, sample in sorted(samples.items()):
            lines.append(f"| {frames} | {sample['rss_bytes'] / 2**20:.1f} | {sample['kv_bytes']} | "
                         f"{sample['kv_allocated_bytes']} | {sample['kv_slots']} | {sample['visual_slots']} | "
                         f"{sample['ttft_s']:.3f} |")
        lines += ["", f"Growth from frame {min(samples)} to {max(samples)}: RSS "
                  f"{(last['rss_bytes'] - first['rss_bytes']) / 2**20:+.1f} MiB "
                  f"({(last['rss_bytes'] / first['rss_bytes'] - 1) * 100:+.1f} %), KV bytes "
                  f"{last['kv_bytes'] - first['kv_bytes']:+d}, KV allocated "
                  f"{last['kv_allocated_bytes'] - first['kv_allocated_bytes']:+d}. The bound is 1 prompt slot + 64 "
                  f"carriers + 4 window frames x 17 slots = 133; below it, the count moves by a few slots as the "
                  f"window frames' carriers enter or leave the carrier memory.", ""]
    if concurrent:
        per_client = ", ".join(f"{max(1, 16 // row['sessions'])} for N = {row['sessions']}" for row in concurrent)
        lines += ["N concurrent WebSocket sessions on loopback, one model thread. Each client streams "
                  "16-frame ShapesWorld clips as PNG frames in real time (8 fps; the session keeps 2 fps) and "
                  f"asks a question after frame 8 and after frame 16 of each clip (clips per client: {per_client}), "
                  "8 new tokens each. Client TTFT: question sent -> first answer event; server TTFT: question "
                  "received -> first token (queueing included).", "",
                  "| sessions | questions | errors | client TTFT p50 s | p95 s | server TTFT p50 s | p95 s |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in concurrent:
            cells = [f"{row[key]:.3f}" if row[key] is not None else "-" for key in
                     ("ttft_p50_s", "ttft_p95_s", "server_ttft_p50_s", "server_ttft_p95_s")]
            lines.append(f"| {row['sessions']} | {row['questions']} | {row['errors']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def replace_section(path: Path, section: str) -> None:
    """Put `section` in place of the section with its title (its first line), or at the end;
    others stay."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    title = section.split("\n", 1)[0]
    start = text.find(title + "\n")
    if start < 0:
        before, after = text.rstrip("\n") + "\n\n", ""
    else:
        following = text.find("\n## ", start + len(title))
        before, after = text[:start], (text[following + 1:] if following >= 0 else "")
    path.write_text(before + section.rstrip("\n") + "\n" + ("\n" + after if after else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10_000, help="frames fed to the long session (0: skip)")
    parser.add_argument("--sessions", type=int, nargs="*", default=[1, 4, 16], help="concurrent session counts")
    parser.add_argument("--model", default=None, help="model folder or preset (default: see the module docstring)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="time cap of each part")
    parser.add_argument("--markdown", type=Path, default=None, help="replace this benchmark's section in this file")
    args = parser.parse_args(argv)
    model, model_name = load_model(args.model)
    long = long_session(model, args.frames, args.max_seconds) if args.frames else None
    if long:
        print(json.dumps(long["samples"]), flush=True)
    concurrent = None
    if args.sessions:
        with tempfile.TemporaryDirectory() as folder:
            if args.model is None:
                model.save_pretrained(folder)  # the server loads the same weights
            concurrent = concurrent_sessions(Path(args.model or folder), args.sessions, args.max_seconds)
    command = "python -m eval.bench_stream " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(command.strip(), model_name, long, concurrent)
    print(section)
    if args.markdown:
        replace_section(args.markdown, section)


if __name__ == "__main__":
    main()
