"""Prometheus metrics of one server, in a registry of its own (so tests can run several apps)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from streaming.engine import EngineStats
from streaming.session import AnswerDone

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKENS_KEPT_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    def __init__(self, engine_stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        Gauge("vidsieve_sessions", "live sessions and HTTP answers in flight",
              registry=self.registry).set_function(lambda: engine_stats().sessions)
        Gauge("vidsieve_queue_depth", "work items (frames, questions, answers) waiting for the model",
              registry=self.registry).set_function(lambda: engine_stats().queue_depth)
        Gauge("vidsieve_kv_bytes", "keys and values held by live sessions",
              registry=self.registry).set_function(lambda: engine_stats().kv_bytes)
        Gauge("vidsieve_decode_steps", "decode steps run since start (one per answer token after the first)",
              registry=self.registry).set_function(lambda: engine_stats().decode_steps)
        Gauge("vidsieve_decode_passes", "forward passes those steps took; steps / passes is the mean decode batch",
              registry=self.registry).set_function(lambda: engine_stats().decode_passes)
        self.time_to_first_token = Histogram("vidsieve_time_to_first_token_seconds",
                                             "from a question's arrival to its first token", ["front_door"],
                                             buckets=TTFT_BUCKETS_S, registry=self.registry)
        self.visual_tokens_kept = Histogram("vidsieve_visual_tokens_kept", "visual tokens an answer read",
                                            ["front_door"], buckets=TOKENS_KEPT_BUCKETS, registry=self.registry)
        self.answers = Counter("vidsieve_answers", "answers finished", ["front_door", "finish_reason"],
                               registry=self.registry)
        self.errors = Counter("vidsieve_errors", "errors reported to clients", ["front_door", "code"],
                              registry=self.registry)
        self.frames = Counter("vidsieve_frames", "frames received on live sessions", registry=self.registry)

    def observe_answer(self, front_door: str, done: AnswerDone) -> None:
        self.answers.labels(front_door, done.finish_reason).inc()
        if done.usage.time_to_first_token_s is not None:
            self.time_to_first_token.labels(front_door).observe(done.usage.time_to_first_token_s)
            self.visual_tokens_kept.labels(front_door).observe(done.usage.visual_tokens_kept)

    def render(self) -> bytes:
        return generate_latest(self.registry)
