"""Hugging Face adapters: LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL and SmolVLM2 through vidsieve.

No downloads: each family is a tiny random-init checkpoint (4-layer, 64-wide language model,
2-layer vision tower) with a processor built offline around a small byte-level BPE, saved
with `save_pretrained` and loaded back through `VLM.from_pretrained`, the path users take.
The family's own `generate` is the reference for exactness; every registered compressor must
run on every family.
"""

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE as SMOLVLM_TEMPLATE

from compressors import Budget, list_compressors, parse_spec
from vlm.adapters import ADAPTERS, HFVideoLM
from vlm.adapters.base import clip_metadata
from vlm.lm_runner import SamplingParams
from vlm.model import VLM, UnknownModelError

QUESTION = "What colour is the circle?"
NEW_TOKENS = 12
FRAMES = np.random.default_rng(0).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
TIMESTAMPS_S = np.array([0.0, 1.0, 2.0, 3.0])
IMAGE = np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8)

# --- tiny checkpoints, built offline -------------------------------------------------------

CORPUS = [
    "What colour is the circle? Which direction does the square move? Describe the video.",
    "You are provided the following series of four frames from a 0:00:04 [H:MM:SS] video.",
    "Frame from 00:01: 00:02: 00:03: user assistant system You are a helpful assistant.",
    "User: Assistant: one two three four five six seven eight nine ten",
]


def byte_level_tokenizer(special: list[str], eos: str, bos: str | None = None) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token=special[0], bos_token=bos)


def text_config(tokenizer, **extra) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **extra)


LLAVA_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llava_onevision():
    tokenizer = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                                     "<|im_end|>")
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
        num_image_tokens=16, vision_feature_select_strategy="full", chat_template=LLAVA_TEMPLATE)
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(text_config(tokenizer), model_type="qwen2"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"))
    return LlavaOnevisionForConditionalGeneration(config), processor


def tiny_qwen(version: str):
    tokenizer = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                      "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], "<|im_end|>")
    pixels = dict(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, patch_size=14, merge_size=2, temporal_patch_size=2)
    if version == "2.5":
        model_class, processor_class, config_class = (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                                                      Qwen2_5_VLConfig)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                      tokens_per_second=2)
    else:
        model_class, processor_class, config_class = Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLConfig
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
    processor = processor_class(image_processor=Qwen2VLImageProcessor(**pixels),
                                video_processor=Qwen2VLVideoProcessor(**pixels), tokenizer=tokenizer,
                                chat_template=QWEN_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim 16
    config = config_class(text_config=text_config(tokenizer, rope_parameters=rope), vision_config=vision,
                          image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                          vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    return model_class(config), processor


def tiny_smolvlm():
    row_col = [f"<row_{row}_col_{col}>" for row in (1, 2, 3) for col in (1, 2, 3)]
    tokenizer = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<video>",
                                      "<fake_token_around_image>", "<global-img>", *row_col],
                                     "<end_of_utterance>", bos="<|im_start|>")
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size={"longest_edge": 128}, max_image_size={"longest_edge": 64}),
        video_processor=SmolVLMVideoProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 64}),
        tokenizer=tokenizer, image_seq_len=16, chat_template=SMOLVLM_TEMPLATE)
    config = SmolVLMConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=64, patch_size=8),
                           text_config=dict(text_config(tokenizer), model_type="llama"), scale_factor=2,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    return SmolVLMForConditionalGeneration(config), processor


BUILDERS = {
    "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": lambda: tiny_qwen("2"),
    "qwen2_5_vl": lambda: tiny_qwen("2.5"),
    "smolvlm": tiny_smolvlm,
}
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


class Family:
    """One tiny checkpoint: the HF reference and vidsieve's adapter loaded from the same folder."""

    def __init__(self, name: str, folder):
        torch.manual_seed(0)
        model, processor = BUILDERS[name]()
        model.eval().save_pretrained(folder)
        processor.save_pretrained(folder)
        self.name, self.reference, self.processor = name, model, processor
        self.adapter = VLM.from_pretrained(folder, device="cpu")
        self.tokens = {"video": self.adapter.encode_frames(FRAMES, TIMESTAMPS_S),
                       "image": self.adapter.encode_image(IMAGE)}
        self.memo: dict = {}  # answers with `none` and selection probes, shared by the compressor tests

    def none_answer(self, kind: str):
        if ("answer", kind) not in self.memo:
            self.memo["answer", kind] = self.adapter.answer_tokens(self.tokens[kind], QUESTION, "none", self.sampling())
        return self.memo["answer", kind]

    def selects_input_tokens(self, name: str, kind: str) -> bool:
        if ("selects", name, kind) not in self.memo:
            self.memo["selects", name, kind] = selects_input_tokens(name, self.adapter, self.tokens[kind])
        return self.memo["selects", name, kind]

    def hf_inputs(self, kind: str):
        """What a user of the family's own API would feed its `generate`."""
        conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": QUESTION}]}]
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        media = (dict(videos=[FRAMES], video_metadata=[clip_metadata(TIMESTAMPS_S)], do_sample_frames=False)
                 if kind == "video" else dict(images=[IMAGE]))
        return self.processor(text=[prompt], return_tensors="pt", **media)

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=NEW_TOKENS, stop_token_ids=self.adapter.default_sampling().stop_token_ids)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """64-wide models gain nothing from a second thread, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def qwen_family(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(request.param))


# --- loading -------------------------------------------------------------------------------


def test_every_family_is_registered_by_its_config_model_type():
    assert set(BUILDERS) <= set(ADAPTERS)


def test_loading_picks_the_adapter_of_the_config_model_type(family):
    assert isinstance(family.adapter, ADAPTERS[family.name])
    assert family.adapter.config.model_type == family.name
    assert family.adapter.config.num_frames >= 1 and family.adapter.display_name


@pytest.mark.parametrize("model_type", ["bert", "idefics2", None])
def test_an_unsupported_model_type_names_the_supported_families(model_type, tmp_path):
    (tmp_path / "config.json").write_text("{}" if model_type is None else f'{{"model_type": "{model_type}"}}')
    with pytest.raises(UnknownModelError) as error:
        VLM.from_pretrained(tmp_path)
    for supported in ("vidsieve", "LLaVA-OneVision", "Qwen2-VL", "Qwen2.5-VL", "SmolVLM2"):
        assert supported in str(error.value)


# --- exactness with `none` -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["image", "video"])
def test_greedy_tokens_equal_the_familys_own_generate(family, kind):
    inputs = family.hf_inputs(kind)
    prompt_length = inputs["input_ids"].shape[1]
    expected = family.reference.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)[0, prompt_length:]
    answer = family.adapter.answer_tokens(family.tokens[kind], QUESTION, "none", family.sampling())
    assert answer.token_ids == expected.tolist()
    assert answer.visual_before == answer.visual_after == len(family.tokens[kind])


@pytest.mark.parametrize("kind", ["image", "video"])
def test_the_uncompressed_prompt_is_the_models_own_input(family, kind):
    """Same token ids as the processor, same embeddings and same positions as the model feeds
    its language model (for Qwen, the 3-D M-RoPE ids of its get_rope_index, text after the
    span included)."""
    inputs = family.hf_inputs(kind)
    tokens = family.tokens[kind]
    prefix, suffix = family.adapter._prompt_ids(QUESTION, tokens.media)
    assert torch.equal(torch.cat([prefix, tokens.media.span_ids, suffix]), inputs["input_ids"][0])

    seen = {}  # what the HF model hands its language model (the adapter's model is the family's own class)
    language_model = family.adapter.language_model
    hook = language_model.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.inference_mode():
        family.adapter.model(**inputs)
    hook.remove()
    prompt = family.adapter.prepare(tokens, QUESTION, parse_spec("none"))
    torch.testing.assert_close(prompt.embeds, seen["inputs_embeds"][0], rtol=0, atol=0)
    if family.name in QWEN_FAMILIES:
        assert torch.equal(prompt.positions, seen["position_ids"][:, 0].T)  # [L, 3] (t, h, w)
    else:
        assert seen.get("position_ids") is None and torch.equal(prompt.positions, torch.arange(len(prompt.embeds)))
    assert int(prompt.is_visual.sum()) == len(tokens)


def test_video_tokens_carry_their_frame_grid_cell_and_time(family):
    tokens = family.tokens["video"]
    frames, rows, cols = tokens.grid_thw
    assert len(tokens) == frames * rows * cols
    assert torch.equal(tokens.frame_index, torch.arange(frames).repeat_interleave(rows * cols))
    assert torch.equal(tokens.grid_rc[: rows * cols, 0], torch.arange(rows).repeat_interleave(cols))
    assert torch.equal(tokens.grid_rc[: rows * cols, 1], torch.arange(cols).repeat(rows))
    step = len(TIMESTAMPS_S) // frames  # Qwen merges frames in pairs, timed at the first of each
    assert tokens.timestamp_s.unique().tolist() == TIMESTAMPS_S[::step].tolist()
    if family.name in QWEN_FAMILIES:  # (t, h, w) with h, w the token's grid cell
        assert torch.equal(tokens.positions[:, 1:], tokens.grid_rc)
    else:
        assert bool((tokens.positions[1:, 0] > tokens.positions[:-1, 0]).all())


# --- every compressor on every family ----------------------------------------------------------

COMPRESSORS = [info.name for info in list_compressors()]


def budgeted(name: str, ratio: float) -> str:
    extra = ",sparse_decode=false" if name == "corematching" else ""  # decode-time FFN slicing is not selection
    return f"{name}:ratio={ratio}{extra}"


def selects_input_tokens(name: str, adapter: HFVideoLM, tokens) -> bool:
    """Whether the method's outputs are some of its input tokens, unchanged (pre-LLM: checked on
    the tokens; in-LLM: methods whose hook drops tokens inside the LM)."""
    compressor = parse_spec(name).compressor
    if compressor.stage != "pre_llm":
        return hasattr(compressor, "hook") and not hasattr(compressor, "new_memory")
    kept = adapter.prepare(tokens, QUESTION, parse_spec(budgeted(name, 0.5)))
    visual = kept.embeds[kept.is_visual]
    return bool((visual[:, None, :] == tokens.embeds[None, :, :]).all(-1).any(1).all())


def size_is_as_promised(name: str, tokens, prompt, visual_after: int, exact: bool) -> bool:
    """The method's size rule at `ratio=0.5`: the budget (exactly for selection methods), or
    the size the method promises instead."""
    count, frames = len(tokens), tokens.num_frames
    if name == "none":
        return visual_after == count
    if name == "avgpool":  # 2x2 windows, whatever the budget
        return visual_after <= frames * math.prod(math.ceil(side / 2) for side in tokens.grid_thw[1:])
    if name == "uniform":  # whole frames
        kept_frames = prompt.frame_index[prompt.is_visual].unique()
        return visual_after == int(torch.isin(tokens.frame_index, kept_frames).sum())
    if name == "videoscan":  # one carrier per frame (memory 64 > frames)
        return visual_after == frames
    budget = Budget(ratio=0.5).resolve(count, frames)
    return visual_after == budget if exact else 0 < visual_after <= budget


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("name", COMPRESSORS)
def test_every_compressor_runs_on_every_family_within_its_budget(family, kind, name):
    tokens = family.tokens[kind]
    spec = parse_spec(budgeted(name, 0.5))
    prompt = family.adapter.prepare(tokens, QUESTION, spec)
    answer = family.adapter.answer_tokens(tokens, QUESTION, spec, family.sampling())
    assert 1 <= len(answer.token_ids) <= NEW_TOKENS
    exact = family.selects_input_tokens(name, kind)
    assert size_is_as_promised(name, tokens, prompt, answer.visual_after, exact), (
        f"{name} on {family.name} {kind}: {answer.visual_before} -> {answer.visual_after}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("name", COMPRESSORS)
def test_selection_methods_keeping_every_token_reproduce_none(family, kind, name):
    tokens = family.tokens[kind]
    if not family.selects_input_tokens(name, kind):
        pytest.skip(f"{name} builds new tokens rather than selecting input tokens")
    reference = family.none_answer(kind)
    answer = family.adapter.answer_tokens(tokens, QUESTION, budgeted(name, 1.0), family.sampling())
    assert answer.visual_after == len(tokens)
    assert answer.token_ids == reference.token_ids


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("name", COMPRESSORS)
def test_qwen_survivors_keep_their_original_3d_positions(qwen_family, kind, name):
    adapter, tokens = qwen_family.adapter, qwen_family.tokens[kind]
    full = adapter.prepare(tokens, QUESTION, parse_spec("none"))
    original = full.positions[full.is_visual]  # [N, 3] absolute (t, h, w)
    prompt = adapter.prepare(tokens, QUESTION, parse_spec(budgeted(name, 0.5)))
    if prompt.hook is None:
        kept = prompt.positions[prompt.is_visual]
    else:  # an in-LLM method: the survivors are the visual slots left in the cache after prefill
        state, _ = adapter.runner.prefill(prompt.embeds, prompt.positions, is_visual=prompt.is_visual,
                                          frame_index=prompt.frame_index, hook=prompt.hook)
        kept = state.positions[state.is_visual]
    matches = (kept[:, None, :] == original[None, :, :]).all(-1)  # [K, N]
    assert bool(matches.any(1).all()), f"{name}: a visual token left its original (t, h, w)"
    source = matches.float().argmax(1)
    assert bool((source[1:] >= source[:-1]).all()), f"{name}: visual tokens left their original order"
    text = prompt.positions[~prompt.is_visual]
    assert torch.equal(text, full.positions[~full.is_visual])  # text after the span does not move


def test_videoscan_keeps_only_carriers_and_text_after_the_clip(family):
    tokens = family.tokens["video"]
    answer = family.adapter.answer_tokens(tokens, QUESTION, "videoscan:memory=2", family.sampling())
    assert answer.visual_after == 2 and len(answer.token_ids) >= 1
