"""LMRunner must reproduce Hugging Face generation exactly, and its KV state must behave."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kernels.errors import VidsieveError
from vlm.kv import KVState
from vlm.lm_runner import LMRunner, SamplingParams, UnsupportedModelError


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(config).eval()


def greedy(runner: LMRunner, embeds: torch.Tensor, new_tokens: int) -> list[int]:
    state, logits = runner.prefill(embeds)
    return list(runner.decode(state, logits, SamplingParams(max_new_tokens=new_tokens)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_tokens_equal_hf_generate_for_a_text_prompt(seed):
    model = tiny_qwen2(seed)
    prompt = torch.randint(0, 96, (1, 13), generator=torch.Generator().manual_seed(seed))
    expected = model.generate(prompt, do_sample=False, max_new_tokens=24, min_new_tokens=24)[0, 13:].tolist()
    runner = LMRunner(model)
    assert greedy(runner, runner.embed(prompt[0]), 24) == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_tokens_equal_hf_generate_for_injected_embeddings(seed):
    model = tiny_qwen2(seed)
    text = torch.randint(0, 96, (5,), generator=torch.Generator().manual_seed(seed))
    visual = torch.randn(17, 32, generator=torch.Generator().manual_seed(seed))  # stand-in for visual tokens
    runner = LMRunner(model)
    embeds = torch.cat([runner.embed(text[:2]), visual, runner.embed(text[2:])])
    expected = model.generate(inputs_embeds=embeds[None], do_sample=False, max_new_tokens=24,
                              min_new_tokens=24)[0].tolist()
    assert greedy(runner, embeds, 24) == expected


def test_llama_family_runs_through_the_same_loop():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 64, (1, 9))
    expected = model.generate(prompt, do_sample=False, max_new_tokens=16, min_new_tokens=16)[0, 9:].tolist()
    runner = LMRunner(model)
    assert greedy(runner, runner.embed(prompt[0]), 16) == expected


def test_chunked_prefill_matches_one_shot_prefill():
    runner = LMRunner(tiny_qwen2())
    embeds = torch.randn(20, 32)
    _, one_shot = runner.prefill(embeds)
    state = runner.new_state(capacity=4)  # forces the storage to grow twice
    runner.forward(embeds[:7], torch.arange(7), state)
    chunked = runner.forward(embeds[7:], torch.arange(7, 20), state)
    torch.testing.assert_close(chunked, one_shot, atol=1e-5, rtol=1e-5)
    assert state.length == 20 and state.next_position == 20


def test_stop_token_ends_decoding_and_is_yielded():
    model = tiny_qwen2()
    runner = LMRunner(model)
    embeds = runner.embed(torch.arange(8))
    free_run = greedy(runner, embeds, 10)
    stop = free_run[3]
    state, logits = runner.prefill(embeds)
    stopped = list(runner.decode(state, logits, SamplingParams(max_new_tokens=10, stop_token_ids=(stop,))))
    assert stopped == free_run[: free_run.index(stop) + 1]


def test_sampling_is_deterministic_under_seed_and_top_p_tiny_is_greedy():
    runner = LMRunner(tiny_qwen2())
    embeds = runner.embed(torch.arange(6))

    def sample(**kwargs):
        state, logits = runner.prefill(embeds)
        return list(runner.decode(state, logits, SamplingParams(max_new_tokens=12, **kwargs)))

    assert sample(temperature=1.0, seed=3) == sample(temperature=1.0, seed=3)
    assert sample(temperature=1.5, seed=3) != sample(temperature=1.5, seed=4)
    assert sample(temperature=1.0, top_p=1e-6, seed=5) == sample()  # nucleus of one token = argmax


def test_unsupported_architecture_names_the_supported_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedModelError, match="qwen2"):
        LMRunner(model)


def test_bad_sampling_parameters_are_user_errors():
    with pytest.raises(VidsieveError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(VidsieveError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_kv_eviction_keeps_order_positions_and_reports_bytes():
    state = KVState(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
                    capacity=2)
    slots = state.reserve(torch.arange(10, 16)[:, None], torch.tensor([0, 1, 1, 1, 0, 0], dtype=torch.bool),
                          torch.tensor([-1, 0, 0, 1, -1, -1]))
    for layer in range(2):
        values = torch.arange(6, dtype=torch.float32).view(1, 6, 1).expand(1, 6, 4) + 100 * layer
        state.write(layer, slots, values, -values)
    assert state.nbytes() == 6 * 2 * 2 * 4 * 4
    freed = state.evict(torch.tensor([True, False, True, False, True, True]))
    assert freed == 2 and state.length == 4
    assert state.positions[:, 0].tolist() == [10, 12, 14, 15]
    assert state.keys(1)[0, 0, :, 0].tolist() == [100, 102, 104, 105]
    assert state.values(0)[0, 0, :, 0].tolist() == [0, -2, -4, -5]
    assert state.is_visual.tolist() == [False, True, False, False]
    assert state.frame_index.tolist() == [-1, 0, -1, -1]
    assert state.nbytes() == 4 * 2 * 2 * 4 * 4


def test_a_batched_decode_step_equals_each_sequence_stepped_alone():
    """Three sequences of different lengths, one with BRA attention and one with CoreMatching's
    sliced FFN: one `step_batch` gives each the logits and the KV its own step would."""
    from kernels import AttentionSpec
    from vlm.lm_runner import PendingStep, SlicedFFN

    runner = LMRunner(tiny_qwen2())
    specs = [AttentionSpec(), AttentionSpec.parse("bra:topk=1,block=4"), AttentionSpec()]

    def prefilled(length: int, seed: int) -> KVState:
        state, _ = runner.prefill(torch.randn(length, 32, generator=torch.Generator().manual_seed(seed)))
        return state

    def sliced(state: KVState) -> KVState:
        state.ffn_slices[1] = SlicedFFN.from_mlp(runner.layers[1].mlp, torch.arange(0, 64, 2))
        return state

    lengths = (9, 23, 40)
    alone, together = [], []
    for states in (alone, together):
        states += [prefilled(length, seed) for seed, length in enumerate(lengths)]
        sliced(states[2])
    tokens = [5, 17, 80]
    expected = []
    for state, spec, token in zip(alone, specs, tokens):  # the ordinary one-token forward
        runner.attention_spec = spec
        expected.append(runner.forward(runner.embed(torch.tensor([token])), torch.tensor([state.next_position]), state))
    runner.attention_spec = AttentionSpec()
    steps = [PendingStep(state, spec, token) for state, spec, token in zip(together, specs, tokens)]
    runner.step_batch(steps)
    for step, logits, state in zip(steps, expected, alone):
        torch.testing.assert_close(step.logits, logits, atol=1e-5, rtol=1e-5)
        assert step.state.length == state.length and step.state.next_position == state.next_position
        for layer in range(2):
            torch.testing.assert_close(step.state.keys(layer), state.keys(layer), atol=1e-5, rtol=1e-5)
    dense = prefilled(40, 2)  # the slices matter: without them the third row differs
    runner.step_batch([unsliced := PendingStep(dense, AttentionSpec(), 80)])
    assert not torch.allclose(unsliced.logits, expected[2], atol=1e-3)


def test_a_failed_batched_step_leaves_every_state_as_it_was(monkeypatch):
    from kernels import AttentionSpec
    from vlm import lm_runner
    from vlm.lm_runner import PendingStep

    runner = LMRunner(tiny_qwen2())
    states = [runner.prefill(torch.randn(length, 32))[0] for length in (6, 11)]
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # layer 1, second sequence: after every state took its slot
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    real = lm_runner.attention
    monkeypatch.setattr(lm_runner, "attention", failing)
    with pytest.raises(RuntimeError):
        runner.step_batch([PendingStep(state, AttentionSpec(), 3) for state in states])
    assert [(s.length, s.next_position) for s in states] == [(6, 6), (11, 11)]
    with pytest.raises(ValueError):
        runner.step_batch([PendingStep(states[0], AttentionSpec(), 3)] * 2)


def test_decode_waits_between_tokens_only_under_an_owner_and_takes_logits_computed_meanwhile():
    runner = LMRunner(tiny_qwen2())
    embeds = torch.randn(8, 32)
    expected = greedy(runner, embeds, 5)
    assert runner.waiting == {}
    runner.owner = "job"
    state, logits = runner.prefill(embeds)
    tokens = runner.decode(state, logits, SamplingParams(max_new_tokens=5))
    got = [next(tokens)]  # the owner is read when decoding starts
    runner.owner = None
    passes = runner.decode_passes
    runner.step_batch([runner.waiting["job"]])  # as the engine does: the step runs outside
    got.append(next(tokens))
    assert runner.decode_passes == passes + 1  # the generator did not step again itself
    got += list(tokens)
    assert got == expected and runner.waiting == {}  # the last token does not wait
