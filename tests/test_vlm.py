"""The VLM folder format, loading errors, and the pipeline's token accounting."""

import numpy as np
import pytest
import torch

from kernels.errors import VidsieveError
from vlm.device import resolve_device, resolve_dtype
from vlm.model import VLM, UnknownModelError, VLMConfig


@pytest.fixture(scope="module")
def model() -> VLM:
    return VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=0)


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (4, 50, 70, 3), dtype=np.uint8), [0.0, 0.5, 1.0, 1.5]


def test_save_and_load_round_trip_gives_identical_answers(model, clip, tmp_path):
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    loaded = VLM.from_pretrained(tmp_path, device="cpu")
    for spec in ("none", "random:ratio=0.5"):
        assert loaded.answer(*clip, "what colour is the circle?", spec).token_ids == \
            model.answer(*clip, "what colour is the circle?", spec).token_ids
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_random_init_is_deterministic_under_seed_and_flagged_untrained(clip):
    a = VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=3)
    b = VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=3)
    assert a.answer(*clip, "how many objects?").token_ids == b.answer(*clip, "how many objects?").token_ids
    assert "untrained" in a.display_name


def test_pipeline_counts_visual_tokens_before_and_after_compression(model, clip):
    full = model.answer(*clip, "what moves?", "none")
    pooled = model.answer(*clip, "what moves?", "avgpool:factor=2")
    assert full.visual_before == full.visual_after == 4 * 4 * 4  # 8x8 patches merged 2x2
    assert pooled.visual_after == 4 * 2 * 2
    assert set(full.timings_s) == {"encode", "compress", "prefill", "generate"}


def test_pruned_tokens_keep_their_original_positions_and_text_continues_after_the_trained_span(model, clip):
    from compressors import parse_spec

    tokens = model.encode_frames(*clip)
    prompt = model.prepare(tokens, "what moves?", parse_spec("uniform:every=2"))
    visual_positions = prompt.positions[prompt.is_visual]
    prefix = int((~prompt.is_visual).nonzero()[0, 0]) + 1  # "<user>" precedes the video
    kept_frames = prompt.frame_index[prompt.is_visual].unique().tolist()
    assert kept_frames == [0, 2]
    assert visual_positions[:16].tolist() == list(range(prefix, prefix + 16))
    assert visual_positions[16:].tolist() == list(range(prefix + 32, prefix + 48))
    text_after = prompt.positions[~prompt.is_visual][prefix:]
    # a clip shorter than the model's trained length: the text sits after num_frames frames
    assert tokens.span_length < model.config.num_frames * 16
    assert int(text_after[0]) == prefix + model.config.num_frames * 16


def test_text_follows_a_long_video_and_a_short_one_is_laid_out_to_the_trained_length(model):
    frames = model.config.num_frames
    assert model.text_position(1, 1 + 3 * 16, 16) == 1 + frames * 16  # 3 frames: as if the rest were dropped
    assert model.text_position(1, 1 + (frames + 5) * 16, 16) == 1 + (frames + 5) * 16  # longer: right after it
    assert model.text_position(1, 1 + 3 * 17, 17) == 1 + frames * 17  # a carrier per frame counts too


@pytest.mark.parametrize("name, message", [
    ("no-such-preset", "no-such-preset"),
    ("owner/no-such-model", "owner/no-such-model"),
])
def test_unknown_models_raise_a_clear_error(name, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModelError, match=message):
        VLM.from_pretrained(name)


def test_a_folder_of_another_model_type_names_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UnknownModelError, match="vidsieve"):
        VLM.from_pretrained(tmp_path)


def test_device_and_dtype_defaults_follow_the_hardware():
    device = resolve_device(None)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(VidsieveError, match="dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_model_runs_in_another_dtype(clip):
    model = VLM.from_config(VLMConfig.from_name("vidsieve-tiny")).to(dtype=torch.bfloat16)
    answer = model.answer(*clip, "what colour is the circle?")
    assert answer.visual_after == 64 and answer.token_ids


def test_conv_stem_halves_once_per_layer_down_to_one_token_per_patch():
    from vlm.encoder import ConvStem

    stem = ConvStem([8, 8, 8, 8], width=24, patch_size=16)
    assert stem(torch.zeros(2, 3, 128, 128)).shape == (2, 24, 8, 8)
    with pytest.raises(ValueError, match="one stride-2 layer per halving"):
        ConvStem([8, 8], width=24, patch_size=16)


def test_motion_input_tower_sees_each_frames_change_from_the_one_before():
    from eval import shapesworld as sw
    from vlm.encoder import MOTION_GAIN

    config = VLMConfig.from_name("vidsieve-tiny")
    config.vision["motion_input"] = True  # as `vidsieve train tiny` builds it
    encoder = VLM.from_config(config).encoder
    assert encoder.motion_input and encoder.visual.conv1[0].in_channels == 6
    frames = sw.render(sw.scene_and_questions("val", 1)[0])[:7]
    pixels = encoder.preprocess(frames)
    assert pixels.shape == (7, 6, 128, 128)
    raw = torch.as_tensor(frames).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(pixels[1:, 3:], MOTION_GAIN * (raw[1:] - raw[:-1]))
    assert pixels[0, 3:].abs().max() == 0  # nothing before the first frame: no change
    assert pixels[1:, 3:].abs().max() > 0.5  # something moves in this clip
    # A clip cut anywhere, the rest given its frame before, encodes as the whole clip (streams,
    # chunks); without that frame the cut frame reads as still.
    whole = encoder.encode(frames).tokens
    tail = encoder.encode(frames[4:], previous=frames[3]).tokens
    torch.testing.assert_close(tail, whole[4:], atol=1e-4, rtol=1e-4)
    encoder.chunk_frames = 3
    try:
        torch.testing.assert_close(encoder.encode(frames).tokens, whole, atol=1e-4, rtol=1e-4)
    finally:
        encoder.chunk_frames = 32
    assert (encoder.encode(frames[4:]).tokens[0] - whole[4]).abs().max() > 1e-3
    clips = encoder.preprocess_clips([frames[:3], frames[3:]])
    assert clips[3, 3:].abs().max() == 0  # a second clip's first frame does not see the first clip


def test_motion_input_needs_a_conv_stem():
    config = VLMConfig.from_name("vidsieve-tiny")
    config.vision["motion_input"] = True
    del config.vision["conv_stem"]
    with pytest.raises(ValueError, match="motion_input needs a conv_stem"):
        VLM.from_config(config)


def test_place_scale_is_saved_with_the_model_and_scales_only_row_and_column(tmp_path):
    config = VLMConfig.from_name("vidsieve-tiny")
    config.place_scale, config.time_scale = 1.0, 0.5
    strong = VLM.from_config(config, seed=0)
    strong.save_pretrained(tmp_path)
    loaded = VLM.from_pretrained(tmp_path, device="cpu").projector
    assert (loaded.place_scale, loaded.time_scale) == (1.0, 0.5)
    config.time_scale = 0.25
    strong = VLM.from_config(config, seed=0)
    default = VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=0)
    frames = torch.arange(3)
    a, b = strong.projector.where_when(frames, 4, 4), default.projector.where_when(frames, 4, 4)
    place = a.shape[-1] // 2  # row and column: the first half of the width; the frame: the second
    torch.testing.assert_close(a[..., :place], 4 * b[..., :place])
    torch.testing.assert_close(a[..., place:], b[..., place:])
