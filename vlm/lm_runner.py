"""LMRunner: an explicit loop over a Hugging Face causal LM's decoder layers (gpt-fast style).

We own the loop instead of calling `model(...)` so that the KV cache, positions and attention
are ours: compressors can drop visual tokens between layers, streaming memory can evict slots,
and attention goes through `kernels.attention`. The weights stay the HF modules' own, so any
checkpoint of a supported family loads with `from_pretrained` and gives the same tokens as
`model.generate` (tested).

Supported decoder layout (Llama, Qwen2, Qwen3, Mistral, and the language models inside
Qwen2-VL / Qwen2.5-VL): pre-norm blocks with `input_layernorm -> self_attn(q/k/v/o_proj,
optional q_norm/k_norm) -> residual -> post_attention_layernorm -> mlp -> residual`, rotary
position embeddings from `model.model.rotary_emb`, and a final `norm` + `lm_head`.

Two rotary variants: plain RoPE over one position id per token, and Qwen2-VL's multimodal
RoPE (M-RoPE), whose rotary embedding takes three ids per token (t, h, w) and splits the
frequencies between them by its `mrope_section`. The runner tells them apart by that
attribute and keeps positions [L, P] (P = 1 or 3) in the `KVState`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from kernels import AttentionSpec, attention
from kernels.bra import frame_regions
from kernels.errors import VidsieveError
from compressors.protocol import LayerObservation, PruneHook
from vlm.kv import TEXT_FRAME, KVState

SUPPORTED_LM_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text")


class UnsupportedModelError(VidsieveError):
    """A checkpoint whose architecture vidsieve cannot run."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise VidsieveError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise VidsieveError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise VidsieveError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class DecodeStats:
    """Filled in while a decode runs; read it after the iterator is exhausted."""

    new_tokens: int = 0
    first_token_s: float | None = None  # seconds from decode start to the first token
    finish_reason: str = ""  # "stop" (EOS/stop id) or "length"
    started_at: float = field(default_factory=time.perf_counter)


@dataclass
class PendingStep:
    """One sequence's next decode step: `token` goes into `state`, and `logits` (None until
    the step has run) are the next token's."""

    state: KVState
    attention: AttentionSpec
    token: int = -1
    logits: torch.Tensor | None = None


@dataclass
class SlicedFFN:
    """A gated FFN restricted to a subset of its hidden units: `down[:, S] (act(gate[S] x) * up[S] x)`.
    Equal to the dense FFN with every other unit's activation set to zero (CoreMatching's decode)."""

    gate: torch.Tensor  # [|S|, D]
    up: torch.Tensor  # [|S|, D]
    down: torch.Tensor  # [D, |S|]
    act: object
    dense_units: int

    @classmethod
    def from_mlp(cls, mlp: torch.nn.Module, neurons: torch.Tensor) -> "SlicedFFN":
        neurons = neurons.to(mlp.gate_proj.weight.device)
        return cls(mlp.gate_proj.weight[neurons].contiguous(), mlp.up_proj.weight[neurons].contiguous(),
                   mlp.down_proj.weight[:, neurons].contiguous(), mlp.act_fn, mlp.gate_proj.weight.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.act(x @ self.gate.T) * (x @ self.up.T)) @ self.down.T

    @property
    def flop_fraction(self) -> float:
        """FFN multiply-adds per token relative to the dense FFN."""
        return self.gate.shape[0] / self.dense_units


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, L, D]; cos, sin: [B, L, D]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class LMRunner:
    """Runs a HF causal LM layer by layer over a `KVState`: a `*ForCausalLM`, or anything shaped
    like one (`.model` the decoder stack, `.lm_head`, `.config`), e.g. a VLM's language model."""

    def __init__(self, causal_lm: torch.nn.Module, attention_spec: AttentionSpec | None = None):
        model_type = getattr(causal_lm.config, "model_type", "?")
        if model_type not in SUPPORTED_LM_TYPES:
            raise UnsupportedModelError(
                f"language model type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_LM_TYPES)}"
            )
        self.lm = causal_lm
        self.config = causal_lm.config
        self.decoder = causal_lm.model  # embed_tokens, layers, norm, rotary_emb
        self.layers = list(self.decoder.layers)
        attn = self.layers[0].self_attn
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        # M-RoPE (Qwen2-VL): three position ids per token, (t, h, w)
        self.position_dims = 3 if hasattr(self.decoder.rotary_emb, "mrope_section") else 1
        self.attention_spec = attention_spec or AttentionSpec()  # dense unless a spec says otherwise
        # Decode steps waiting between tokens, by owner (see `decode`); the engine batches them.
        self.owner: str | None = None
        self.waiting: dict[str, PendingStep] = {}
        self.decode_steps = 0  # decode steps run, and the forward passes they took (`step_batch`)
        self.decode_passes = 0

    @property
    def device(self) -> torch.device:
        return self.lm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.lm_head.weight.dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [L] -> embeddings [L, D]."""
        return self.decoder.embed_tokens(token_ids.to(self.device))

    def new_state(self, capacity: int = 256) -> KVState:
        return KVState(
            num_layers=len(self.layers),
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
            position_dims=self.position_dims,
            capacity=capacity,
        )

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        state: KVState,
        *,
        is_visual: torch.Tensor | None = None,
        frame_index: torch.Tensor | None = None,
        hook: PruneHook | None = None,
    ) -> torch.Tensor:
        """Append L tokens to `state` and return the logits of the last one.

        embeds: [L, D] input embeddings; positions: [L] absolute position ids, or [L, 3] (t, h, w)
        for an M-RoPE model ([L] there means text: the same id on all three axes).
        is_visual / frame_index: [L] slot metadata (default: text).
        hook: an in-LLM pruning hook; after its layer, the tokens it drops leave the sequence
        (and every layer's cache), so later layers and decoding never see them.
        Returns logits [V] (float32) for the token after the last input.
        """
        length = embeds.shape[0]
        positions = self._position_ids(positions)  # [L, P]
        if is_visual is None:
            is_visual = torch.zeros(length, dtype=torch.bool)
        if frame_index is None:
            frame_index = torch.full((length,), TEXT_FRAME, dtype=torch.long)
        slots = state.reserve(positions, is_visual, frame_index)
        state.next_position = int(positions.max()) + 1  # M-RoPE too: text resumes after the largest id

        hidden = embeds.to(self.dtype).unsqueeze(0)  # [1, L, D]
        cos, sin = self._rotary(hidden, positions)  # [1, L, Dh] each
        for layer_index, layer in enumerate(self.layers):
            observing = hook is not None and layer_index in hook.layers
            wants = hook.wants if observing else None
            attended, text_attention = self._attention_block(layer, layer_index, hidden, cos, sin, state, slots,
                                                             observe=wants == "attention")
            hidden = hidden + attended
            wants_neurons = hook is not None and hasattr(hook, "decode_neurons") and length > 1
            mlp_out, activations = self._mlp_block(layer, layer_index, hidden, state,
                                                   observe=wants == "ffn" or wants_neurons)
            hidden = hidden + mlp_out
            if wants_neurons:
                neurons = hook.decode_neurons(layer_index, activations)
                if neurons is not None:
                    state.ffn_slices[layer_index] = SlicedFFN.from_mlp(layer.mlp, neurons)
            if observing:
                chunk_visual, chunk_frames = state.is_visual[slots], state.frame_index[slots]
                keep = hook.select(LayerObservation(layer_index, chunk_visual, chunk_frames, text_attention,
                                                    activations if wants == "ffn" else None))
                keep = keep.to(self.device) | ~chunk_visual  # text always survives
                if not bool(keep.all()):
                    everything = torch.ones(state.length, dtype=torch.bool, device=self.device)
                    everything[slots] = keep
                    state.evict(everything)
                    slots = slice(slots.start, slots.start + int(keep.sum()))
                    hidden, cos, sin = hidden[:, keep], cos[:, keep], sin[:, keep]
        last = self.decoder.norm(hidden[:, -1:])
        return self.lm.lm_head(last)[0, -1].float()

    def _position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """[L] or [L, P] -> [L, P] int64 on the model's device."""
        positions = positions.to(self.device).long()
        if positions.dim() == 1:
            return positions[:, None].expand(-1, self.position_dims)
        if positions.shape[1] != self.position_dims:
            raise ValueError(f"this model takes {self.position_dims} position ids per token, got {positions.shape[1]}")
        return positions

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, L, Dh] for positions [L, P]: the model's own rotary embedding, which for
        M-RoPE takes ids [3, 1, L] and interleaves the (t, h, w) frequencies by its mrope_section."""
        if self.position_dims == 1:
            return self.decoder.rotary_emb(hidden, positions[:, 0].unsqueeze(0))
        return self.decoder.rotary_emb(hidden, positions.T.unsqueeze(1))

    def _attention_block(self, layer, layer_index, hidden, cos, sin, state, slots, *, observe=False):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        batch, length, _ = x.shape
        q = attn.q_proj(x).view(batch, length, -1, self.head_dim)
        k = attn.k_proj(x).view(batch, length, -1, self.head_dim)
        v = attn.v_proj(x).view(batch, length, -1, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # [1, H_q, L, Dh]
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # [1, H_kv, L, Dh]
        state.write(layer_index, slots, k[0], v.transpose(1, 2)[0])
        keys, values = state.keys(layer_index), state.values(layer_index)
        out = attention(q, keys, values, scale=self.scale, **self._routing(state))
        text_attention = self._text_attention(q, keys, state, slots) if observe else None
        return attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), text_attention

    def _routing(self, state: KVState, spec: AttentionSpec | None = None) -> dict:
        """Per-call arguments of bi-level routing attention (`spec`, else the runner's): regions
        by frame when asked, and text slots forced (every query reads the prompt's text)."""
        spec = spec or self.attention_spec
        if spec.kind == "dense":
            return {}
        regions = frame_regions(state.frame_index) if spec.regions == "frames" else None
        return {"spec": spec, "region_ids": regions, "forced": ~state.is_visual}

    def _text_attention(self, q, keys, state, slots) -> torch.Tensor:
        """Head-averaged attention [Q, L] of the chunk's question tokens over the chunk's slots,
        computed explicitly for this one layer (every other layer keeps the fused kernel)."""
        chunk_visual = state.is_visual[slots]
        visual_at = chunk_visual.nonzero()
        after = int(visual_at[-1]) + 1 if len(visual_at) else chunk_visual.numel() - 1
        rows = torch.arange(min(after, chunk_visual.numel() - 1), chunk_visual.numel(), device=q.device)
        group = q.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(group, dim=1)  # [1, H_q, S, Dh]
        scores = (q[:, :, rows] @ keys.transpose(-1, -2)) * self.scale  # [1, H_q, Q, S]
        query_slots = slots.start + rows
        allowed = torch.arange(keys.shape[2], device=q.device)[None, :] <= query_slots[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1).mean(1)[0][:, slots]  # [Q, L]

    def _mlp_block(self, layer, layer_index, hidden, state, *, observe=False):
        """The FFN, as sliced core neurons during decode when a hook asked for it, with its hidden
        activations when observed."""
        x = layer.post_attention_layernorm(hidden)
        if hidden.shape[1] == 1 and layer_index in state.ffn_slices:
            return state.ffn_slices[layer_index](x), None
        if not observe:
            return layer.mlp(x), None
        mlp = layer.mlp
        activations = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # [1, L, I]
        return mlp.down_proj(activations), activations[0]

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor | None = None, **options) -> tuple[KVState, torch.Tensor]:
        """Fresh state from input embeddings [L, D] (positions default to 0..L-1). Returns (state, logits [V])."""
        if positions is None:
            positions = torch.arange(embeds.shape[0])
        state = self.new_state(capacity=max(256, 2 * embeds.shape[0]))
        logits = self.forward(embeds, positions, state, **options)
        return state, logits

    def decode(
        self,
        state: KVState,
        logits: torch.Tensor,
        sampling: SamplingParams,
        stats: DecodeStats | None = None,
    ) -> Iterator[int]:
        """Yield new token ids, starting from the logits of the last prefilled token.

        Stops after a stop token (which is yielded) or `max_new_tokens`. If `owner` is set when
        it starts (the engine sets it to the job being served), each step waits in `waiting`
        between tokens, so the engine can run the steps of several owners as one batch
        (`step_batch`); the next token then reads the logits that batch computed.
        """
        stats = stats if stats is not None else DecodeStats()
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
        stop_ids = set(sampling.stop_token_ids)
        step = PendingStep(state, self.attention_spec)
        owner = self.owner
        try:
            for produced in range(1, sampling.max_new_tokens + 1):
                token = pick_next_token(logits, sampling, generator)
                stats.new_tokens += 1
                if stats.first_token_s is None:
                    stats.first_token_s = time.perf_counter() - stats.started_at
                last = token in stop_ids or produced == sampling.max_new_tokens
                step.token, step.logits = token, None
                if owner is not None and not last:
                    self.waiting[owner] = step
                yield token
                self.waiting.pop(owner, None)
                if token in stop_ids:
                    stats.finish_reason = "stop"
                    return
                if last:
                    break
                if step.logits is None:  # not run in a batch meanwhile
                    self.step_batch([step])
                logits = step.logits
            stats.finish_reason = "length"
        finally:
            if owner is not None and self.waiting.get(owner) is step:
                del self.waiting[owner]

    @torch.inference_mode()
    def step_batch(self, steps: list[PendingStep]) -> None:
        """One decode step of several sequences at once: each appends its `token` to its own
        `KVState` (each of its own length) and gets the `logits` of the next token.

        The projections, FFNs and LM head run as one [B, 1, D] batch, so their weights are read
        once for B sequences (what bounds a decode step); attention runs per sequence over its
        own keys, with its own attention spec. A sequence with core-neuron FFN slices
        (CoreMatching) takes its slices. If anything fails, every state is as it was."""
        states = [step.state for step in steps]
        if len({id(state) for state in states}) != len(states):
            raise ValueError("a batch holds each KVState at most once")
        before = [(state.length, state.next_position) for state in states]
        try:
            positions = self._position_ids(torch.tensor([state.next_position for state in states]))  # [B, P]
            slots = []
            for state, position in zip(states, positions):
                slots.append(state.reserve(position[None], torch.zeros(1, dtype=torch.bool),
                                           torch.full((1,), TEXT_FRAME, dtype=torch.long)))
                state.next_position = int(position.max()) + 1
            hidden = self.embed(torch.tensor([step.token for step in steps]))[:, None].to(self.dtype)  # [B, 1, D]
            cos, sin = self._rotary(hidden.transpose(0, 1), positions)  # [1, B, Dh]
            cos, sin = cos.transpose(0, 1), sin.transpose(0, 1)  # [B, 1, Dh]
            for layer_index, layer in enumerate(self.layers):
                hidden = hidden + self._batch_attention(layer, layer_index, hidden, cos, sin, steps, slots)
                hidden = hidden + self._batch_mlp(layer, layer_index, hidden, states)
            logits = self.lm.lm_head(self.decoder.norm(hidden))[:, 0].float()  # [B, V]
        except BaseException:
            for state, (length, next_position) in zip(states, before):
                state.truncate(length)
                state.next_position = next_position
            raise
        for step, row in zip(steps, logits):
            step.logits = row
        self.decode_steps += len(steps)
        self.decode_passes += 1

    def _batch_attention(self, layer, layer_index, hidden, cos, sin, steps, slots):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        batch = x.shape[0]
        q = attn.q_proj(x).view(batch, 1, -1, self.head_dim)
        k = attn.k_proj(x).view(batch, 1, -1, self.head_dim)
        v = attn.v_proj(x).view(batch, 1, -1, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, H_q, 1, Dh]
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # [B, H_kv, 1, Dh]
        v = v.transpose(1, 2)
        out = []
        for row, (step, slot) in enumerate(zip(steps, slots)):
            state = step.state
            state.write(layer_index, slot, k[row], v[row])
            out.append(attention(q[row:row + 1], state.keys(layer_index), state.values(layer_index), scale=self.scale,
                                 **self._routing(state, step.attention)))
        return attn.o_proj(torch.cat(out).transpose(1, 2).reshape(batch, 1, -1))

    def _batch_mlp(self, layer, layer_index, hidden, states):
        x = layer.post_attention_layernorm(hidden)
        sliced = [row for row, state in enumerate(states) if layer_index in state.ffn_slices]
        if not sliced:
            return layer.mlp(x)
        out = torch.empty_like(x)
        dense = [row for row in range(len(states)) if row not in sliced]
        if dense:
            out[dense] = layer.mlp(x[dense])
        for row in sliced:
            out[row] = states[row].ffn_slices[layer_index](x[row:row + 1])[0]
        return out


def pick_next_token(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator) -> int:
    """Greedy when temperature is 0, else temperature + nucleus (top-p) sampling. logits: [V]."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= sampling.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
