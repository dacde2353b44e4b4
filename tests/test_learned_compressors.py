"""The learned compressors (hicom, quecc): shapes, gradients, conditioning, weights, training."""

import dataclasses

import pytest
import torch

from compressors import Budget, CompressionContext, VisualTokens, parse_spec
from compressors.learned import CompressorWeightsError, largest_cell_grid
from eval.train_compressor import CompressorTrainConfig, train_compressor
from vlm.model import VLM, VLMConfig

DIM, GUIDE_DIM = 16, 12


class FakeModel:
    """A model handle with small widths: question vectors depend on the question's words."""

    def __init__(self, state=None):
        self.state = state
        self.asked = []

    def _vector(self, text):
        seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(text))
        return torch.randn(GUIDE_DIM, generator=torch.Generator().manual_seed(seed))

    def embed_text(self, text):
        return self._vector(text)

    def question_state(self, text):
        return self._vector(text)

    def compressor_state(self, name):
        self.asked.append(name)
        return self.state


def make_tokens(t=8, h=4, w=4, seed=0, embeds=None) -> VisualTokens:
    if embeds is None:
        embeds = torch.randn(t, h, w, DIM, generator=torch.Generator().manual_seed(seed))
    return VisualTokens.from_grid(embeds, [0.5 * i for i in range(embeds.shape[0])])


def run(spec_text, tokens, question="what colour is the circle ?", model=None, seed=0, budget=None):
    spec = parse_spec(spec_text)
    ctx = CompressionContext(question, budget=budget or spec.budget, seed=seed, model=model or FakeModel())
    return spec.compressor, spec.compressor.compress(tokens, ctx)


# --- sizes ---------------------------------------------------------------------------------


def test_hicom_without_budget_gives_local_cells_newline_and_global_tokens():
    tokens = make_tokens(t=16, h=4, w=4)
    _, out = run("hicom", tokens)

    # 4x3x3 groups adapted to a 16x4x4 grid: 4 x 2 x 2 cells, then newline and 32 globals.
    assert len(out) == 16 + 1 + 32
    assert out.frame_index[:16].tolist() == [t for t in (0, 4, 8, 12) for _ in range(4)]
    assert out.grid_rc[:4].tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]
    assert bool((out.positions[16:] == tokens.positions[-1]).all())  # newline + globals: last token's


def test_hicom_with_a_small_group_grid_and_no_globals_is_local_only():
    tokens = make_tokens(t=4, h=4, w=4)
    _, out = run("hicom:group_t=2,group_h=2,group_w=2,num_global=0", tokens)
    assert len(out) == 2 * 2 * 2


def test_quecc_gives_per_frame_tokens_and_one_token_per_video():
    tokens = make_tokens(t=8, h=4, w=4)
    assert len(run("quecc", tokens)[1]) == 8
    assert len(run("quecc:per_frame_tokens=4", tokens)[1]) == 32
    _, per_video = run("single-token:per_video=true,tokens=20", tokens)  # the budget is ignored
    assert len(per_video) == 1
    assert per_video.positions.tolist() == [[0]] and per_video.frame_index.tolist() == [0]


def test_quecc_budget_that_does_not_factor_over_the_grid_gives_the_largest_count_below_it():
    image = make_tokens(t=1, h=4, w=4)
    assert len(run("quecc", image, budget=Budget(tokens=7))[1]) == 6  # 7 cells do not tile 4x4
    assert largest_cell_grid((1, 4, 4), 7) == (1, 3, 2)
    assert largest_cell_grid((16, 4, 4), 16) == (16, 1, 1)  # frames kept apart first


def test_cells_skip_what_an_earlier_compressor_dropped():
    tokens = make_tokens(t=4, h=4, w=4)
    pruned = tokens.select(tokens.frame_index != 1)  # frame 1 gone: its cells are empty
    _, out = run("quecc", pruned, budget=Budget(per_frame=1))
    assert out.frame_index.tolist() == [0, 2, 3]


# --- learning ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_text", ["hicom", "quecc:per_frame_tokens=4"])
def test_gradients_reach_every_weight_and_the_input_tokens(spec_text):
    leaf = torch.randn(4, 4, 4, DIM, requires_grad=True)
    compressor, out = run(spec_text, make_tokens(embeds=leaf))
    target = torch.randn(out.embeds.shape, generator=torch.Generator().manual_seed(1))

    (out.embeds * target).sum().backward()

    for name, parameter in compressor.module.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name
    assert bool(leaf.grad.abs().sum() > 0)


def test_hicom_global_queries_and_tokens_are_distinct():
    compressor, out = run("hicom", make_tokens(t=8))
    queries = compressor.module.global_queries.detach()  # [32, D]
    global_tokens = out.embeds[-32:].detach()
    for rows in (queries, global_tokens):
        gaps = torch.cdist(rows, rows) + torch.eye(len(rows)) * 1e9
        assert float(gaps.min()) > 1e-4


@pytest.mark.parametrize("spec_text", ["hicom", "quecc"])
def test_the_question_changes_the_output(spec_text):
    tokens = make_tokens()
    compressor = parse_spec(spec_text).compressor
    outputs = [compressor.compress(tokens, CompressionContext(question, model=FakeModel())).embeds
               for question in ("what colour is the circle ?", "where is the square ?")]
    assert outputs[0].shape == outputs[1].shape
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-6)


@pytest.mark.parametrize("spec_text", ["hicom", "quecc"])
def test_initial_weights_follow_the_seed_and_leave_the_global_rng_alone(spec_text):
    tokens = make_tokens()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = run(spec_text, tokens, seed=1)[1].embeds
    assert torch.equal(torch.rand(3), expected_draw)
    assert torch.equal(run(spec_text, tokens, seed=1)[1].embeds, a)
    assert not torch.equal(run(spec_text, tokens, seed=2)[1].embeds, a)


def test_trained_weights_from_the_model_replace_the_initialisation():
    tokens = make_tokens()
    trained, _ = run("hicom", tokens, seed=5)
    state = {k: v.clone() for k, v in trained.module.state_dict().items()}
    handle = FakeModel(state)

    loaded, out = run("hicom", tokens, model=handle, seed=9)

    assert handle.asked == ["hicom"]
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(out.embeds, run("hicom", tokens, seed=5)[1].embeds)


def test_weights_that_do_not_fit_raise_a_typed_error():
    trained, _ = run("hicom", make_tokens())
    handle = FakeModel(trained.module.state_dict())
    with pytest.raises(CompressorWeightsError, match="do not fit"):
        run("hicom:num_global=8", make_tokens(), model=handle)


def test_tokens_made_in_inference_mode_compress_differentiably_and_inside_inference_mode():
    with torch.inference_mode():
        frozen = make_tokens()
        _, inside = run("quecc", frozen)
    compressor, outside = run("quecc", frozen)
    assert torch.allclose(inside.embeds, outside.embeds)
    outside.embeds.sum().backward()  # the module's weights were not made inference tensors
    assert compressor.module.kernel.grad is not None


# --- training on the frozen tiny model -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=0).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name, saved_as", [("hicom", "hicom"), ("single-token", "quecc")])
def test_training_steps_update_only_the_compressor_and_the_weights_reload(tiny_folder, name, saved_as):
    model = VLM.from_pretrained(tiny_folder, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = CompressorTrainConfig(clips_per_step=1, max_steps=2, lr=1e-2)
    initial = parse_spec(name).compressor.new_module(128, 128)

    path = train_compressor(model, name, minutes=5, config=config, report=lambda _: None)

    assert path == tiny_folder / "compressors" / f"{saved_as}.safetensors"
    assert len(config.log) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in config.log)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"model weight {key} changed"
    shipped = model.compressor_state(saved_as)
    assert shipped.keys() == initial.state_dict().keys()
    assert any(not torch.equal(shipped[k], v) for k, v in initial.state_dict().items())

    fresh = parse_spec(name)  # a new instance loads the shipped weights on first use
    tokens = model.encode_frames(torch.zeros(2, 128, 128, 3, dtype=torch.uint8).numpy(), [0.0, 0.5])
    per_frame = dataclasses.replace(fresh, budget=Budget(per_frame=1))
    model.prepare(tokens, "what colour is the circle ?", per_frame)
    for key, value in fresh.compressor.module.state_dict().items():
        assert torch.equal(value, shipped[key]), key


def test_train_compressor_command_saves_weights_beside_the_model_and_refuses_untrainable(tmp_path, capsys):
    from safetensors import safe_open

    from server.cli import main
    from vlm.model import VLM, VLMConfig

    VLM.from_config(VLMConfig.from_name("vidsieve-tiny")).save_pretrained(tmp_path)
    assert main(["train", "compressor", "single-token", "--model", str(tmp_path), "--minutes", "0.02"]) == 0
    assert (tmp_path / "compressors" / "quecc.safetensors").is_file()
    assert VLM.from_pretrained(tmp_path).compressor_state("quecc")
    assert main(["train", "compressor", "hicom", "--model", str(tmp_path), "--steps", "2"]) == 0
    assert safe_open(tmp_path / "compressors" / "hicom.safetensors", "pt").metadata()["steps"] == "2"
    assert main(["train", "compressor", "hicom", "--model", str(tmp_path), "--steps", "0"]) == 2
    assert main(["train", "compressor", "random", "--model", str(tmp_path)]) == 2
    assert "no weights to train" in capsys.readouterr().err


def test_a_step_counted_run_gives_the_same_weights_however_long_its_steps_take(tiny_folder, tmp_path):
    """--steps: the learning-rate schedule runs over the steps, not the clock, so a rerun on a
    busy machine is the same run."""
    import shutil
    import time

    weights = []
    for run, pause in enumerate((0.0, 0.3)):
        folder = tmp_path / f"run{run}"
        shutil.copytree(tiny_folder, folder, ignore=shutil.ignore_patterns("compressors"))
        model = VLM.from_pretrained(folder, device="cpu")
        config = CompressorTrainConfig(clips_per_step=1, max_steps=3, lr=1e-2, report_every=1)
        path = train_compressor(model, "quecc", minutes=float("inf"), config=config,
                                report=lambda _: time.sleep(pause))
        weights.append(VLM.from_pretrained(folder, device="cpu").compressor_state("quecc"))
        assert path.is_file()
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
