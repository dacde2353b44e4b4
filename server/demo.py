"""Gradio demo: ask a video anything, watch the answer stream, and see which tokens survived.

    vidsieve demo --port 7860        # http://127.0.0.1:7860, works offline on first launch

Three tabs over one model (chosen at the top with its attention spec):
- Ask: a video (uploaded, or a bundled ShapesWorld example), a compressor spec and a budget,
  a question. The answer streams; beside it the sampled frames with the kept tokens outlined
  and the dropped ones dimmed, the token counts before and after, and the time to first token
  against `none`, measured on the spot on the same visual tokens.
- Side by side: two compressors on the same video and question, decoded in lockstep.
- Live: webcam frames (or a bundled clip pushed frame by frame) go into the same
  `streaming.session.Session` the WebSocket server uses, on an `Engine` of its own; its KV stays
  bounded by the session's memory policy however long the stream runs.

Every error a user can cause (bad file, unknown spec or model) arrives as a message in the
status box and a toast, never as a broken page. gradio is imported lazily (the `demo` extra).
"""

from __future__ import annotations

import json
import logging
import queue
import tempfile
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from compressors import CompressorSpec, VisualTokens, list_compressors, parse_spec
from kernels.errors import VidsieveError
from streaming import SamplingPlan, open_video

log = logging.getLogger("vidsieve.demo")

DEFAULT_MODEL = "vidsieve-tiny"
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "eval" / "samples"
KEEP_ALL = "keep all"
BUDGETS = ("ratio=0.5", "ratio=0.25", "ratio=0.1", "per_frame=2", "tokens=32", KEEP_ALL)
MAX_NEW_TOKENS = 32  # as VLM.answer's default sampling
MODELS_HELD = 2  # (model, attention) pairs kept loaded; the oldest goes first
LIVE_MAX_SESSIONS = 4
LIVE_ANSWER_TIMEOUT_S = 120.0
FRAME_DISPLAY_WIDTH_PX = 160  # each sampled frame in the overlay
OVERLAY_COLUMNS = 4
KEPT_OUTLINE = (255, 204, 0)
CARRIER_OUTLINE = (0, 200, 255)
DROPPED_WASH = (96, 96, 96)  # dropped cells fade toward this grey
DROPPED_FADE = 0.7
TTFT_REPEATS = 3  # time to first token: the best of this many runs, so a busy machine skews less


class DemoInputError(VidsieveError):
    """Something missing or malformed in what the page sent (no video, no question)."""


def import_gradio():
    try:
        import gradio
    except ImportError:
        raise VidsieveError("the demo needs gradio: pip install vidsieve[demo]") from None
    return gradio


# --- bundled examples ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    video: Path
    question: str
    answer: str  # the manifest's correct answer


def bundled_examples(per_video: int = 2) -> list[Example]:
    """The first `per_video` questions of each bundled ShapesWorld clip."""
    examples, taken = [], Counter()
    for row in json.loads((SAMPLES_DIR / "manifest.json").read_text()):
        taken[row["video"]] += 1
        if taken[row["video"]] <= per_video:
            examples.append(Example(SAMPLES_DIR / row["video"], row["question"], str(row["answer"])))
    return examples


# --- what a compressor kept ---------------------------------------------------------------------


@dataclass(frozen=True)
class KeptTokens:
    """The visual tokens that reach decoding, as places in the clip's token grid."""

    frame_index: torch.Tensor  # [K] frame of each kept grid token
    grid_rc: torch.Tensor  # [K, 2] its (row, col)
    carrier_frames: tuple[int, ...]  # frames summed up by one VideoScan carrier that stayed

    @property
    def count(self) -> int:
        return len(self.frame_index) + len(self.carrier_frames)


@torch.inference_mode()
def kept_tokens(model, tokens: VisualTokens, question: str, spec: CompressorSpec, *, seed: int = 0) -> KeptTokens:
    """Which of `tokens` survive `spec` for `question`, for ANY compressor.

    Pre-LLM methods decide before the LM (`prepare` lays out the survivors); in-LLM ones
    (fastv, corematching, a ToDRE stage-2 hook) decide during prefill, so the prefill is run
    here and the surviving KV slots are read back. VideoScan keeps only its per-frame
    carriers: those stand for a whole frame, not a grid cell.
    """
    prompt = model.prepare(tokens, question, spec, seed=seed)
    if hasattr(spec.compressor, "new_memory"):
        state, _ = model._prefill_with_carriers(tokens, question, spec.compressor.new_memory())
        carriers = state.frame_index[state.is_visual].tolist()
        empty = torch.zeros(0, dtype=torch.long)
        return KeptTokens(empty, empty.view(0, 2), tuple(carriers))
    if prompt.hook is not None:
        state, _ = model.runner.prefill(prompt.embeds, prompt.positions, is_visual=prompt.is_visual,
                                        frame_index=prompt.frame_index, hook=prompt.hook)
        is_visual, positions, frames = state.is_visual, state.positions[:, 0], state.frame_index
    else:
        is_visual, positions, frames = prompt.is_visual, prompt.positions, prompt.frame_index  # positions [L]
    # Visual tokens sit at their original positions after the text prefix, so (frame, position)
    # names one token of the uncompressed grid.
    prefix_length = int(prompt.is_visual.int().argmax())
    index_of = {(int(f), prefix_length + int(p)): i
                for i, (f, p) in enumerate(zip(tokens.frame_index.tolist(), tokens.positions[:, 0].tolist()))}
    kept = [index_of[(int(f), int(p))] for f, p in zip(frames[is_visual].tolist(), positions[is_visual].tolist())]
    kept = torch.tensor(kept, dtype=torch.long)
    return KeptTokens(tokens.frame_index.cpu()[kept], tokens.grid_rc.cpu()[kept], ())


def token_cell(model, tokens: VisualTokens) -> tuple[int, int]:
    """(cell_px, input_px): one LM token covers a cell_px square of the input_px-square image the
    tower sees (patch_size * spatial_merge of image_size); other models: the token grid's share."""
    vision = getattr(model.config, "vision", None)
    if isinstance(vision, dict):
        return vision["patch_size"] * model.config.spatial_merge, vision["image_size"]
    return 1, tokens.grid_thw[2]


# --- the overlay --------------------------------------------------------------------------------


def render_overlay(frames: np.ndarray, timestamps_s, kept: KeptTokens, cell_px: int, input_px: int,
                   *, columns: int = OVERLAY_COLUMNS, frame_width_px: int = FRAME_DISPLAY_WIDTH_PX) -> Image.Image:
    """The sampled frames [T, H, W, 3] in a grid: kept cells bright and outlined, dropped cells
    dimmed, frames kept only as a VideoScan carrier dimmed whole with a blue frame.

    The tower sees each frame stretched to an input_px square, so a cell_px token cell maps back
    to (W * cell_px / input_px) x (H * cell_px / input_px) displayed pixels.
    """
    count, height, width = frames.shape[:3]
    shown_w, shown_h = frame_width_px, max(1, round(height * frame_width_px / width))
    cell_w, cell_h = shown_w * cell_px / input_px, shown_h * cell_px / input_px
    font = ImageFont.load_default(size=12)
    caption_px = 18
    rows = -(-count // columns)
    sheet = Image.new("RGB", (columns * (shown_w + 4), rows * (shown_h + caption_px + 4)), (24, 24, 24))
    by_frame: dict[int, list[tuple[int, int]]] = {}
    for frame, (row, col) in zip(kept.frame_index.tolist(), kept.grid_rc.tolist()):
        by_frame.setdefault(frame, []).append((row, col))
    resample = Image.NEAREST if shown_w >= width else Image.BILINEAR  # keep small shapes crisp
    for t in range(count):
        original = Image.fromarray(frames[t]).resize((shown_w, shown_h), resample)
        tile = Image.blend(original, Image.new("RGB", original.size, DROPPED_WASH), DROPPED_FADE)
        draw = ImageDraw.Draw(tile)
        for row, col in by_frame.get(t, []):
            box = (round(col * cell_w), round(row * cell_h), round((col + 1) * cell_w), round((row + 1) * cell_h))
            tile.paste(original.crop(box), box[:2])
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=KEPT_OUTLINE, width=2)
        carrier = t in kept.carrier_frames
        if carrier:
            draw.rectangle((0, 0, shown_w - 1, shown_h - 1), outline=CARRIER_OUTLINE, width=3)
        x, y = (t % columns) * (shown_w + 4) + 2, (t // columns) * (shown_h + caption_px + 4) + 2
        sheet.paste(tile, (x, y))
        label = f"t={float(timestamps_s[t]):.2f}s  " + ("carrier" if carrier else f"{len(by_frame.get(t, []))} kept")
        ImageDraw.Draw(sheet).text((x + 2, y + shown_h + 3), label, fill=(230, 230, 230), font=font)
    return sheet


# --- answering ----------------------------------------------------------------------------------


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    timestamps_s: list[float]
    tokens: VisualTokens
    encode_s: float


class StreamedAnswer:
    """One answer's token ids, decoded as they come. `compute_s` counts only the time spent
    producing this answer's tokens, so answers stepped in lockstep are timed fairly."""

    def __init__(self, model, clip: Clip, question: str, spec: CompressorSpec):
        self.timings: dict = {}
        self._tokenizer = model.tokenizer
        self._tokens = model.stream_tokens(clip.tokens, question, spec, model.default_sampling(MAX_NEW_TOKENS),
                                           self.timings)
        self.ids: list[int] = []
        self.text = ""
        self.compute_s = 0.0
        self.first_token_s: float | None = None
        self.done = False

    def step(self) -> bool:
        """Produce the next token; False once the answer is finished."""
        if self.done:
            return False
        start = time.perf_counter()
        try:
            token = next(self._tokens)
        except StopIteration:
            self.done = True
            return False
        finally:
            self.compute_s += time.perf_counter() - start
        if self.first_token_s is None:
            self.first_token_s = self.compute_s
        self.ids.append(token)
        self.text = self._tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        return True

    def close(self) -> None:
        self._tokens.close()


def time_to_first_token_s(model, clip: Clip, question: str, spec: CompressorSpec) -> float:
    """Compress + prefill + first decode step of `spec` on the clip's tokens, best of TTFT_REPEATS."""
    times = []
    for _ in range(TTFT_REPEATS):
        answer = StreamedAnswer(model, clip, question, spec)
        answer.step()
        answer.close()
        times.append(answer.compute_s)
    return min(times)


def combine_spec(compressor: str, budget: str) -> CompressorSpec:
    """`todre` + `ratio=0.25` -> `todre:ratio=0.25`; `fastv:layer=2` + `tokens=32` -> `fastv:layer=2,tokens=32`;
    "keep all" adds nothing. parse_spec refuses a spec that already names another budget."""
    compressor, budget = (compressor or "").strip(), (budget or "").strip()
    if not budget or budget == KEEP_ALL:
        return parse_spec(compressor)
    return parse_spec(f"{compressor}{',' if ':' in compressor else ':'}{budget}")


def stats_table(rows: list[tuple[str, int, int, float]], cell_px: int, input_px: int, encode_s: float) -> str:
    """Markdown: per spec the visual tokens before -> after and the time to first token."""
    baseline = next((ttft for name, _, _, ttft in rows if name == "none"), None)
    lines = ["| compressor | visual tokens | time to first token |", "|---|---|---|"]
    for name, before, after, ttft in rows:
        speedup = f" ({baseline / ttft:.2f}x vs none)" if baseline and name != "none" else ""
        lines.append(f"| `{name}` | {before} -> {after} ({after / before:.0%}) | {ttft * 1000:.1f} ms{speedup} |")
    lines.append(f"\nEach token covers a {cell_px}x{cell_px} px cell of the {input_px} px model input. Time to first "
                 f"token: compress + prefill + one decode step, best of {TTFT_REPEATS}, measured now on this machine; "
                 f"encoding the frames (shared by all) took {encode_s * 1000:.0f} ms.")
    return "\n".join(lines)


class DemoModels:
    """Loaded models by (name, attention), the most recent `MODELS_HELD` of them."""

    def __init__(self):
        self._held: OrderedDict[tuple[str, str], object] = OrderedDict()

    def get(self, name: str, attention: str):
        from vlm.model import VLM

        key = ((name or DEFAULT_MODEL).strip(), (attention or "dense").strip())
        if key not in self._held:
            self._held[key] = VLM.from_pretrained(key[0], attention=key[1])
            while len(self._held) > MODELS_HELD:
                self._held.popitem(last=False)
        self._held.move_to_end(key)
        return self._held[key]


def read_clip(model, video: str | None) -> Clip:
    """Sample the model's number of frames from the file and encode them once."""
    if not video:
        raise DemoInputError("Upload a video or pick one of the bundled examples first.")
    frames = open_video(video, SamplingPlan(num_frames=model.config.num_frames)).read_all()
    pixels = np.stack([frame.rgb for frame in frames])
    timestamps = [frame.timestamp_s for frame in frames]
    start = time.perf_counter()
    tokens = model.encode_frames(pixels, timestamps)
    return Clip(pixels, timestamps, tokens, time.perf_counter() - start)


def model_note(model) -> str:
    trained = getattr(model.config, "trained", True)
    return f"Model: {model.display_name}." + ("" if trained else " Untrained: its answers are not meaningful yet.")


def finished_note(model, answers: list[StreamedAnswer]) -> str:
    empty = [a for a in answers if not a.text]
    note = f"Done. {model_note(model)}"
    if empty:
        note += f" {len(empty[0].ids)} answer tokens decode to no words."
    return note


# --- live mode: a streaming Session on an Engine of its own -------------------------------------


class LiveFeed:
    """One page's live stream: a `Session` admitted to the demo's live `Engine`. Frames get
    timestamps that advance by the real gap between pushes; the session's memory policy bounds
    its KV (carriers plus a window of recent frames)."""

    def __init__(self, engine, key: tuple[str, str, str], compressor: str, attention: str):
        from streaming.session import Session, SessionConfig

        self.key = key
        self.engine = engine
        self.events: queue.Queue = queue.Queue()
        config = SessionConfig(compressor=compressor, attention=attention, fps=None)  # the page paces the frames
        self.session = Session(engine.model, config, self.events.put, session_id=uuid.uuid4().hex)
        engine.admit(self.session)
        self._last_s: float | None = None
        self._last_push_at: float | None = None

    def push(self, rgb: np.ndarray, gap_s: float | None = None) -> None:
        """Queue one uint8 [H, W, 3] frame, `gap_s` after the previous one (default: wall clock)."""
        now = time.perf_counter()
        if gap_s is None:
            gap_s = now - self._last_push_at if self._last_push_at is not None else 0.0
        timestamp_s = 0.0 if self._last_s is None else self._last_s + max(gap_s, 1e-3)
        self.session.push_frame(timestamp_s, lambda: np.ascontiguousarray(rgb, dtype=np.uint8))
        self._last_s, self._last_push_at = timestamp_s, now
        self.engine.notify()

    def ask(self, text: str) -> Iterator[tuple[str, object | None]]:
        """Yield (answer so far, AnswerDone or None) until the answer is done."""
        from streaming.session import AnswerDelta, AnswerDone, ErrorEvent, Question

        question_id = uuid.uuid4().hex
        model = self.engine.model
        self.session.ask(Question(question_id, text, model.default_sampling(MAX_NEW_TOKENS)))
        self.engine.notify()
        answer = ""
        while True:
            try:
                event = self.events.get(timeout=LIVE_ANSWER_TIMEOUT_S)
            except queue.Empty:
                raise VidsieveError(f"no answer within {LIVE_ANSWER_TIMEOUT_S:.0f} s; the model is busy") from None
            if isinstance(event, ErrorEvent) and (event.question_id == question_id or event.fatal):
                raise VidsieveError(event.message)
            if isinstance(event, AnswerDelta) and event.question_id == question_id:
                answer += event.text
                yield answer, None
            elif isinstance(event, AnswerDone) and event.question_id == question_id:
                yield event.text, event
                return

    def describe(self) -> str:
        session, memory = self.session, self.session.config.memory
        state = session.state
        kept = int(state.is_visual.sum()) if state is not None else 0
        return (f"frames pushed {session.frames_received}, encoded {session.frames_seen}; visual tokens seen "
                f"{session.visual_tokens_seen}, in the KV now {kept}; KV {session.kv_bytes() / 1024:.0f} KiB. "
                f"Memory policy: {memory.carriers} carriers + every token of the last {memory.window_frames} frames.")

    def close(self) -> None:
        self.engine.close(self.session)


class Demo:
    """The handlers behind the page, free of gradio so they can be called directly."""

    def __init__(self, default_model: str = DEFAULT_MODEL):
        self.default_model = default_model
        self.models = DemoModels()
        self._live_engines: dict[str, object] = {}

    # Ask --------------------------------------------------------------------------------------

    def ask(self, video, question, model_name, attention, compressor, budget) -> Iterator[tuple]:
        """Yield (answer, overlay image, stats markdown, status) as the answer streams."""
        model = self.models.get(model_name, attention)
        spec = combine_spec(compressor, budget)
        question = _question(question)
        clip = read_clip(model, video)
        cell_px, input_px = token_cell(model, clip.tokens)
        overlay = render_overlay(clip.frames, clip.timestamps_s, kept_tokens(model, clip.tokens, question, spec),
                                 cell_px, input_px)
        answer = StreamedAnswer(model, clip, question, spec)
        while answer.step():
            yield answer.text, overlay, "", f"Answering with `{spec}` ..."
        rows = [("none", len(clip.tokens), len(clip.tokens), time_to_first_token_s(model, clip, question, parse_spec("none"))),
                (spec.text, answer.timings["visual_before"], answer.timings["visual_after"],
                 time_to_first_token_s(model, clip, question, spec))]
        yield answer.text, overlay, stats_table(rows, cell_px, input_px, clip.encode_s), finished_note(model, [answer])

    # Side by side -----------------------------------------------------------------------------

    def compare(self, video, question, model_name, attention, compressor_a, compressor_b, budget) -> Iterator[tuple]:
        """Yield (answer A, overlay A, answer B, overlay B, stats, status); both decode in lockstep."""
        model = self.models.get(model_name, attention)
        specs = [combine_spec(compressor_a, budget), combine_spec(compressor_b, budget)]
        question = _question(question)
        clip = read_clip(model, video)
        cell_px, input_px = token_cell(model, clip.tokens)
        overlays = [render_overlay(clip.frames, clip.timestamps_s, kept_tokens(model, clip.tokens, question, spec),
                                   cell_px, input_px) for spec in specs]
        answers = [StreamedAnswer(model, clip, question, spec) for spec in specs]
        status = f"Answering with `{specs[0]}` and `{specs[1]}` ..."
        while any([answer.step() for answer in answers]):  # a list: step both every round
            yield answers[0].text, overlays[0], answers[1].text, overlays[1], "", status
        rows = [("none", len(clip.tokens), len(clip.tokens), time_to_first_token_s(model, clip, question, parse_spec("none")))]
        rows += [(spec.text, a.timings["visual_before"], a.timings["visual_after"],
                  time_to_first_token_s(model, clip, question, spec)) for spec, a in zip(specs, answers)]
        yield (answers[0].text, overlays[0], answers[1].text, overlays[1],
               stats_table(rows, cell_px, input_px, clip.encode_s), finished_note(model, answers))

    # Live -------------------------------------------------------------------------------------

    def live_feed(self, feed: LiveFeed | None, model_name, attention, compressor) -> LiveFeed:
        """The page's feed, reopened when the model, attention or compressor changed."""
        key = ((model_name or self.default_model).strip(), (attention or "dense").strip(), (compressor or "none").strip())
        if feed is not None and feed.key == key:
            return feed
        opened = LiveFeed(self._live_engine(key[0]), key, key[2], key[1])  # if this fails, the old feed stays
        if feed is not None:
            feed.close()
        return opened

    def _live_engine(self, model_name: str):
        """One engine per model name, on its own copy of the model (the Ask tabs use theirs)."""
        if model_name not in self._live_engines:
            from streaming.engine import Engine, EngineConfig
            from vlm.model import VLM

            model = VLM.from_pretrained(model_name)
            self._live_engines[model_name] = Engine(model, EngineConfig(max_sessions=LIVE_MAX_SESSIONS)).start()
        return self._live_engines[model_name]

    def close(self) -> None:
        for engine in self._live_engines.values():
            engine.shutdown()
        self._live_engines.clear()


def _question(text: str | None) -> str:
    if not text or not text.strip():
        raise DemoInputError("Type a question about the video first.")
    return text.strip()


# --- the page -----------------------------------------------------------------------------------


def as_png_files(values: tuple, folder: Path) -> tuple:
    """Hand each PIL image to Gradio as a PNG file written once.

    A streaming handler yields the same overlay with every token. Given the image itself, Gradio
    re-encodes it into its cache file on every yield, rewriting the file while the browser may be
    reading it (uvicorn then fails with "Too much data for declared Content-Length"). A file that
    is written once and never changes is copied into the cache once, atomically."""
    out = []
    for value in values:
        if isinstance(value, Image.Image):
            path = folder / f"overlay-{id(value):x}.png"
            if not path.exists():
                value.save(path, format="PNG")
            value = str(path)
        out.append(value)
    return tuple(out)


def build_demo(default_model: str = DEFAULT_MODEL):
    """The Gradio Blocks app. API names: /ask, /compare, /live_frame, /live_example, /live_ask."""
    gr = import_gradio()
    demo = Demo(default_model)
    examples = bundled_examples()
    compressor_names = [info.name for info in list_compressors()]

    def reported(handler, outputs: int):
        """Run a streaming handler; a user's mistake (or a bug) becomes a toast and a status line."""
        def run(*args):
            with tempfile.TemporaryDirectory(prefix="vidsieve-demo-") as folder:
                try:
                    for values in handler(*args):
                        yield as_png_files(values, Path(folder))
                except VidsieveError as error:
                    gr.Warning(str(error))
                    yield (*[gr.skip()] * (outputs - 1), f"Error: {error}")
                except Exception as error:
                    log.exception("demo handler failed")
                    gr.Warning(f"internal error: {type(error).__name__}")
                    yield (*[gr.skip()] * (outputs - 1), f"Error: internal error ({type(error).__name__}); see the server log.")
        return run

    def example_picker(video, question, **options):
        """Clickable bundled examples that fill a video and a question box."""
        return gr.Examples([[str(e.video), e.question] for e in examples], [video, question],
                           example_labels=[f"{e.video.stem}: {e.question}" for e in examples],
                           label="Bundled ShapesWorld examples", **options)

    with gr.Blocks(title="vidsieve demo", analytics_enabled=False) as blocks:
        blocks.handlers = demo  # for tests, and for launch_demo's shutdown
        gr.Markdown("# vidsieve: ask a video anything, and see which visual tokens the model kept")
        with gr.Row():
            model_name = gr.Dropdown([default_model], value=default_model, allow_custom_value=True,
                                     label="Model (preset, folder or hub id)", elem_id="model")
            attention = gr.Textbox("dense", label="Attention (dense, or bra:topk=8,block=64)", elem_id="attention")
        with gr.Tab("Ask"):
            with gr.Row():
                with gr.Column(scale=2):
                    video = gr.Video(label="Video", sources=["upload"], elem_id="video")
                    question = gr.Textbox(label="Question", elem_id="question")
                    with gr.Row():
                        compressor = gr.Dropdown(compressor_names, value="todre", allow_custom_value=True,
                                                 label="Compressor spec (e.g. fastv:layer=2)", elem_id="compressor")
                        budget = gr.Dropdown(list(BUDGETS), value="ratio=0.25", allow_custom_value=True,
                                             label="Budget", elem_id="budget")
                    ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                    example_picker(video, question, elem_id="examples")
                with gr.Column(scale=3):
                    answer = gr.Textbox(label="Answer", lines=2, interactive=False, elem_id="answer")
                    status = gr.Textbox(label="Status", interactive=False, elem_id="status")
                    overlay = gr.Image(label="Kept tokens (outlined) on the sampled frames", type="pil",
                                       format="png", interactive=False, elem_id="overlay")
                    stats = gr.Markdown(elem_id="stats")
            ask_button.click(reported(demo.ask, 4), [video, question, model_name, attention, compressor, budget],
                             [answer, overlay, stats, status], api_name="ask", concurrency_id="model")
        with gr.Tab("Side by side"):
            with gr.Row():
                with gr.Column():
                    video_2 = gr.Video(label="Video", sources=["upload"])
                    question_2 = gr.Textbox(label="Question")
                    example_picker(video_2, question_2)
                with gr.Column():
                    compressor_a = gr.Dropdown(compressor_names, value="fastv", allow_custom_value=True, label="Compressor A")
                    compressor_b = gr.Dropdown(compressor_names, value="todre", allow_custom_value=True, label="Compressor B")
                    budget_2 = gr.Dropdown(list(BUDGETS), value="ratio=0.25", allow_custom_value=True, label="Budget (both)")
                    compare_button = gr.Button("Compare", variant="primary")
                    status_2 = gr.Textbox(label="Status", interactive=False)
            with gr.Row():
                with gr.Column():
                    answer_a = gr.Textbox(label="Answer A", interactive=False)
                    overlay_a = gr.Image(label="Kept by A", type="pil", format="png", interactive=False)
                with gr.Column():
                    answer_b = gr.Textbox(label="Answer B", interactive=False)
                    overlay_b = gr.Image(label="Kept by B", type="pil", format="png", interactive=False)
            stats_2 = gr.Markdown()
            compare_button.click(reported(demo.compare, 6),
                                 [video_2, question_2, model_name, attention, compressor_a, compressor_b, budget_2],
                                 [answer_a, overlay_a, answer_b, overlay_b, stats_2, status_2],
                                 api_name="compare", concurrency_id="model")
        with gr.Tab("Live"):
            gr.Markdown("Frames go into a streaming session (as over the WebSocket server), which keeps a bounded "
                        "KV: VideoScan carriers plus every token of the most recent frames. Ask at any time.")
            feed = gr.State(None, delete_callback=lambda live: live.close() if live is not None else None)
            with gr.Row():
                with gr.Column():
                    webcam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam")
                    live_compressor = gr.Textbox("none", label="Per-frame compressor (question-agnostic, "
                                                 "or videoscan:memory=N)")
                    clips = sorted({e.video.name for e in examples})
                    live_example = gr.Dropdown(clips, value=clips[0],
                                               label="...or push a bundled clip frame by frame")
                    push_button = gr.Button("Push clip")
                with gr.Column():
                    live_frame = gr.Image(label="Last frame pushed", interactive=False)
                    live_question = gr.Textbox(label="Question")
                    live_ask_button = gr.Button("Ask the stream", variant="primary")
                    live_answer = gr.Textbox(label="Answer", interactive=False)
                    live_status = gr.Textbox(label="Stream", interactive=False)

            def push_webcam(frame, live, model, attention_spec, live_spec):
                if frame is not None:
                    live = demo.live_feed(live, model, attention_spec, live_spec)
                    live.push(frame)
                    yield live, gr.skip(), live.describe()

            def push_clip(name, live, model, attention_spec, live_spec):
                live = demo.live_feed(live, model, attention_spec, live_spec)
                previous_s = None
                for frame in open_video(SAMPLES_DIR / Path(name).name):
                    live.push(frame.rgb, None if previous_s is None else frame.timestamp_s - previous_s)
                    previous_s = frame.timestamp_s
                    yield live, frame.rgb, live.describe()

            def ask_live(text, live):
                if live is None:
                    raise DemoInputError("Start the webcam or push a clip first.")
                for answer_text, done in live.ask(_question(text)):
                    yield answer_text, live.describe() if done else "answering ..."

            live_inputs = [feed, model_name, attention, live_compressor]
            webcam.stream(reported(push_webcam, 3), [webcam, *live_inputs],
                          [feed, live_frame, live_status], api_name="live_frame", stream_every=0.5)
            push_button.click(reported(push_clip, 3), [live_example, *live_inputs], [feed, live_frame, live_status],
                              api_name="live_example")
            live_ask_button.click(reported(ask_live, 2), [live_question, feed], [live_answer, live_status],
                                  api_name="live_ask")
    return blocks


def launch_demo(blocks=None, *, port: int = 7860, model: str = DEFAULT_MODEL, block: bool = True):
    """Serve the demo on 127.0.0.1:`port`; `block=False` returns at once (tests)."""
    gr = import_gradio()
    blocks = blocks or build_demo(model)
    # System fonts only: the page must not wait on a font server it cannot reach offline.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    blocks.queue(default_concurrency_limit=1)
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=not block, quiet=not block,
                  theme=theme, footer_links=["api"], ssr_mode=False)
    if block:
        blocks.handlers.close()
    return blocks
