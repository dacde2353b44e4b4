"""Bi-level routing attention inside vidsieve-tiny: at full top-k it is dense attention."""

import numpy as np
import pytest

from eval import shapesworld as sw
from kernels import AttentionSpec, AttentionSpecError, use_backend
from vlm.model import VLM, VLMConfig


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip():
    frames = sw.render(sw.scene_and_questions("val", 5)[0])[:5]
    return frames, np.arange(5) / 8.0


@pytest.mark.parametrize("spec", ["bra:topk=64,block=8", "bra:topk=16,regions=frames,sinks=0"])
@pytest.mark.parametrize("backend", ["reference", "gathered"])
def test_bra_at_full_topk_gives_the_greedy_tokens_of_dense_attention(folder, clip, spec, backend):
    dense = VLM.from_pretrained(folder, device="cpu")
    routed = VLM.from_pretrained(folder, device="cpu", attention=spec)
    assert str(routed.runner.attention_spec) == str(AttentionSpec.parse(spec))
    for question in ("What colour is the circle?", "How many objects are there at the end?"):
        expected = dense.answer(*clip, question, "none", dense.default_sampling(8)).token_ids
        with use_backend(backend):
            assert routed.answer(*clip, question, "none", routed.default_sampling(8)).token_ids == expected


def test_sparse_bra_runs_and_stays_close_to_dense_logits(folder, clip):
    dense = VLM.from_pretrained(folder, device="cpu")
    routed = VLM.from_pretrained(folder, device="cpu", attention="bra:topk=1,block=8,sinks=1")
    tokens = dense.encode_frames(*clip)
    from compressors import parse_spec

    prompt = dense.prepare(tokens, "What colour is the circle?", parse_spec("none"))
    _, dense_logits = dense.runner.prefill(prompt.embeds, prompt.positions, is_visual=prompt.is_visual,
                                           frame_index=prompt.frame_index)
    _, routed_logits = routed.runner.prefill(prompt.embeds, prompt.positions, is_visual=prompt.is_visual,
                                             frame_index=prompt.frame_index)
    assert routed_logits.shape == dense_logits.shape
    assert not routed_logits.isnan().any()
    assert (routed_logits - dense_logits).abs().max() > 0  # it really routed


def test_a_bad_attention_spec_is_a_user_error(folder):
    with pytest.raises(AttentionSpecError, match="topk"):
        VLM.from_pretrained(folder, attention="bra:topk=zero")
