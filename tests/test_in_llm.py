"""In-LLM compressors (FastV, CoreMatching) through the LM runner's prune hook."""

import numpy as np
import pytest
import torch

from compressors import parse_spec
from compressors.corematching import core_neurons, elbow_count, sentence_core_neurons
from eval import shapesworld as sw
from vlm.lm_runner import SlicedFFN
from vlm.model import VLM, VLMConfig

QUESTION = "What colour is the dot on the circle?"


@pytest.fixture(scope="module")
def model() -> VLM:
    return VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=2)


@pytest.fixture(scope="module")
def tokens(model):
    frames = sw.render(sw.scene_and_questions("val", 3)[0])[:4]
    return model.encode_frames(frames, np.arange(4) / 8.0)


def prefill(model, tokens, spec_text):
    prompt = model.prepare(tokens, QUESTION, parse_spec(spec_text))
    state, logits = model.runner.prefill(prompt.embeds, prompt.positions, is_visual=prompt.is_visual,
                                         frame_index=prompt.frame_index, hook=prompt.hook)
    return prompt, state, logits


@pytest.mark.parametrize("spec", ["fastv:ratio=1.0", "fastv:layer=1,tokens=64", "corematching:ratio=1.0"])
def test_keep_everything_budgets_give_the_logits_of_none(model, tokens, spec):
    _, _, expected = prefill(model, tokens, "none")
    _, state, logits = prefill(model, tokens, spec)
    assert int(state.is_visual.sum()) == len(tokens)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_fastv_keeps_the_visual_tokens_the_last_token_attends_to_most_at_layer_k_minus_1(model, tokens):
    prompt, state, _ = prefill(model, tokens, "fastv:layer=2,ratio=0.25")
    kept = int(state.is_visual.sum())
    assert kept == round(0.25 * len(tokens))
    assert state.length == len(prompt.embeds) - (len(tokens) - kept)  # removed, not zeroed
    # Independent check: Hugging Face's own eager attention of the full prompt at layer 1.
    model.lm.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model.lm(inputs_embeds=prompt.embeds[None], position_ids=prompt.positions[None],
                           output_attentions=True)
    finally:
        model.lm.config._attn_implementation = "sdpa"
    last_row = out.attentions[1][0].mean(0)[-1]  # [L] head-averaged attention of the last token
    visual_at = prompt.is_visual.nonzero()[:, 0]
    expected = set(prompt.positions[visual_at[torch.topk(last_row[visual_at], kept).indices]].tolist())
    assert set(state.positions[state.is_visual][:, 0].tolist()) == expected


def test_fastv_without_a_budget_keeps_half_and_decodes(model, tokens):
    answer = model.answer_tokens(tokens, QUESTION, "fastv", model.default_sampling(4))
    assert answer.visual_before == len(tokens) and answer.visual_after == len(tokens) // 2
    assert 1 <= len(answer.token_ids) <= 4


def test_corematching_removes_tokens_and_decodes_on_core_neuron_slices(model, tokens):
    prompt, state, _ = prefill(model, tokens, "corematching:beta=0.25")
    assert int(state.is_visual.sum()) < len(tokens)
    layers = len(model.runner.layers)
    assert sorted(state.ffn_slices) == list(range(layers))
    for sliced in state.ffn_slices.values():
        assert sliced.flop_fraction == pytest.approx(0.25, abs=1 / sliced.dense_units)
    answer = model.answer_tokens(tokens, QUESTION, "corematching:beta=0.25", model.default_sampling(4))
    assert answer.token_ids


def test_sliced_ffn_equals_the_dense_ffn_restricted_to_core_neurons(model):
    mlp = model.runner.layers[0].mlp
    x = torch.randn(3, 1, model.lm.config.hidden_size)
    neurons = torch.tensor([0, 5, 17, 100, 383])
    with torch.no_grad():
        activations = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        mask = torch.zeros(activations.shape[-1])
        mask[neurons] = 1
        dense_restricted = mlp.down_proj(activations * mask)
        sliced = SlicedFFN.from_mlp(mlp, neurons)(x)
    torch.testing.assert_close(sliced, dense_restricted, atol=1e-6, rtol=1e-5)


def test_core_neurons_sentence_neurons_and_elbow():
    activations = torch.tensor([[3.0, 2.0, 1.0, -1.0, 0.0], [0.0, 5.0, 0.0, 4.0, -2.0]])
    cores = core_neurons(activations, rho=0.5)
    assert cores.tolist() == [[True, True, False, False, False], [False, True, False, False, False]]
    assert sentence_core_neurons(cores, beta=0.2).tolist() == [1]
    assert elbow_count(torch.tensor([10.0, 9.5, 9.0, 2.0, 1.5, 1.0])) == 3
    assert elbow_count(torch.tensor([4.0, 4.0])) == 2


def test_todre_stage2_drops_visual_tokens_where_question_attention_to_them_fades(model, tokens):
    _, expected_state, expected = prefill(model, tokens, "todre:ratio=0.5")
    prompt, state, logits = prefill(model, tokens, "todre:ratio=0.5,stage2=true,stage2_threshold=1.0")
    assert prompt.hook.dropped_at == 0  # any mass is below 1.0: dropped after the first layer
    assert int(state.is_visual.sum()) == 0 and int(expected_state.is_visual.sum()) == len(tokens) // 2
    _, _, never = prefill(model, tokens, "todre:ratio=0.5,stage2=true,stage2_threshold=0.0")
    torch.testing.assert_close(never, expected, atol=1e-5, rtol=1e-5)  # mass never below 0: nothing dropped
    fixed, fixed_state, _ = prefill(model, tokens, "todre:ratio=0.5,stage2=true,stage2_layer=3")
    assert fixed.hook.dropped_at == 2 and int(fixed_state.is_visual.sum()) == 0
    assert len(fixed.hook.masses) == 1 and 0 <= fixed.hook.masses[0] <= 1


def test_todre_stage2_makes_kv_reuse_refuse(model, tokens):
    from kernels.errors import VidsieveError

    with pytest.raises(VidsieveError, match="inside the LM"):
        model.prefill_video(tokens, "todre:ratio=0.5,stage2=true")
    assert model.prefill_video(tokens, "todre:ratio=0.5").visual_after == len(tokens) // 2
