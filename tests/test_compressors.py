"""Budget, CompressionContext, the registry and spec strings, and the baseline compressors."""

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from compressors import (
    Budget,
    BudgetError,
    CompressionContext,
    SpecError,
    VisualTokens,
    list_compressors,
    parse_spec,
    register_compressor,
    unregister_compressor,
)
from compressors.context import ContextError
from kernels.errors import VidsieveError


def make_tokens(t=2, h=5, w=7, d=3, position_style="1d", seed=0) -> VisualTokens:
    embeds = torch.randn(t, h, w, d, generator=torch.Generator().manual_seed(seed))
    return VisualTokens.from_grid(embeds, [float(i) for i in range(t)], position_style)


# ---------------------------------------------------------------- Budget


def test_budget_resolves_ratio_tokens_per_frame_and_keep_all():
    assert Budget(ratio=0.1).resolve(100, 4) == 10
    assert Budget(ratio=0.25).resolve(10, 2) == 3  # 2.5 rounds half up
    assert Budget(tokens=7).resolve(100, 4) == 7
    assert Budget(per_frame=3).resolve(100, 4) == 12
    assert Budget().resolve(100, 4) == 100


def test_budget_clamps_to_between_one_and_all_tokens():
    assert Budget(ratio=0.001).resolve(100, 4) == 1
    assert Budget(tokens=500).resolve(100, 4) == 100
    assert Budget(per_frame=50).resolve(100, 4) == 100
    assert Budget(ratio=0.5).resolve(0, 0) == 0


def test_budget_keeps_all_only_when_nothing_is_dropped():
    assert Budget().keeps_all(10, 2)
    assert Budget(ratio=1.0).keeps_all(10, 2)
    assert Budget(tokens=10).keeps_all(10, 2)
    assert not Budget(tokens=9).keeps_all(10, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": 0.1, "tokens": 5}, "at most one of"),
        ({"ratio": 0.0}, r"ratio must be a number in \(0, 1\]"),
        ({"ratio": 1.5}, r"ratio must be a number in \(0, 1\]"),
        ({"tokens": 0}, "tokens must be an integer >= 1"),
        ({"per_frame": 2.5}, "per_frame must be an integer >= 1"),
    ],
)
def test_budget_refuses_invalid_values_with_a_budget_error(kwargs, message):
    with pytest.raises(BudgetError, match=message) as err:
        Budget(**kwargs)
    assert isinstance(err.value, VidsieveError)


# ---------------------------------------------------------------- CompressionContext


def test_context_embeds_question_once_through_the_model_handle():
    calls = []

    class FakeModel:
        def embed_text(self, text):
            calls.append(text)
            return torch.full((4,), float(len(text)))

    ctx = CompressionContext(question="what color?", model=FakeModel())

    assert ctx.question_embedding.tolist() == [11.0] * 4
    assert ctx.question_embedding.tolist() == [11.0] * 4
    assert calls == ["what color?"]


def test_context_without_model_explains_missing_embedding():
    with pytest.raises(ContextError, match="no model handle"):
        CompressionContext(question="why?").question_embedding


def test_context_generator_is_seeded():
    a = torch.rand(3, generator=CompressionContext(seed=5).generator("cpu"))
    b = torch.rand(3, generator=CompressionContext(seed=5).generator("cpu"))
    c = torch.rand(3, generator=CompressionContext(seed=6).generator("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- Registry and specs


@pytest.fixture
def fake_compressor():
    """A 'keepfirst' compressor registered for one test through the real registry."""

    @register_compressor("keepfirst", aliases=("kf",))
    @dataclass
    class KeepFirst:
        """Keeps the first `count` tokens.

        Second docstring line, not part of the summary.
        """

        stage = "pre_llm"
        trainable = False
        uses_question = False
        count: int = field(default=1, metadata={"help": "how many tokens to keep"})
        scale: float = field(default=1.0, metadata={"help": "embedding multiplier"})
        verbose: bool = field(default=False, metadata={"help": "say more"})
        mode: str = field(default="plain", metadata={"help": "a free string"})

        def compress(self, tokens, ctx):
            kept = tokens.select(torch.arange(self.count))
            return kept.with_embeds(kept.embeds * self.scale)

    yield KeepFirst
    unregister_compressor("keepfirst")


def test_fake_compressor_registered_through_registry_parses_and_runs(fake_compressor):
    spec = parse_spec("  KF : count = 3 , scale=2.5, verbose=YES ")
    tokens = make_tokens()

    out = spec.compressor.compress(tokens, CompressionContext(budget=spec.budget))

    assert spec.name == "keepfirst"
    assert isinstance(spec.compressor, fake_compressor)
    assert spec.compressor.name == "keepfirst"
    assert (spec.compressor.count, spec.compressor.scale, spec.compressor.verbose) == (3, 2.5, True)
    assert torch.equal(out.embeds, tokens.embeds[:3] * 2.5)
    assert spec.budget == Budget()


def test_fake_compressor_is_gone_after_unregistering(fake_compressor):
    unregister_compressor("keepfirst")
    with pytest.raises(SpecError, match="Unknown compressor 'keepfirst'"):
        parse_spec("keepfirst")
    with pytest.raises(SpecError, match="Unknown compressor 'kf'"):
        parse_spec("kf")
    register_compressor("keepfirst", aliases=("kf",))(fake_compressor)  # for the fixture's teardown


def test_registering_a_taken_name_or_alias_is_refused(fake_compressor):
    @dataclass
    class Other:
        """Another."""

        stage = "pre_llm"
        trainable = False
        uses_question = False

        def compress(self, tokens, ctx):
            return tokens

    with pytest.raises(ValueError, match="'keepfirst' is already registered"):
        register_compressor("keepfirst")(Other)
    with pytest.raises(ValueError, match="'kf' is already registered"):
        register_compressor("other", aliases=("kf",))(Other)
    with pytest.raises(ValueError, match="'random' is already registered"):
        register_compressor("random")(Other)
    assert "other" not in [info.name for info in list_compressors()]


def test_registering_non_dataclass_or_untyped_parameter_is_refused():
    class NotADataclass:
        stage = "pre_llm"
        trainable = False
        uses_question = False

    @dataclass
    class ListParam:
        stage = "pre_llm"
        trainable = False
        uses_question = False
        sizes: list = field(default_factory=list)

        def compress(self, tokens, ctx):
            return tokens

    with pytest.raises(TypeError, match="must be a dataclass"):
        register_compressor("notdc")(NotADataclass)
    with pytest.raises(TypeError, match="int, float, bool or str"):
        register_compressor("listparam")(ListParam)
    assert {"notdc", "listparam"}.isdisjoint(info.name for info in list_compressors())


def test_spec_text_is_canonical_and_round_trips(fake_compressor):
    spec = parse_spec("kf: verbose=1, Ratio=0.25,count=2")

    assert spec.text == "keepfirst:count=2,mode=plain,ratio=0.25,scale=1.0,verbose=true"
    assert str(spec) == spec.text
    assert spec.budget == Budget(ratio=0.25)
    again = parse_spec(spec.text)
    assert again.text == spec.text
    assert again.compressor == spec.compressor and again.budget == spec.budget


def test_spec_budget_keys_become_a_budget_for_every_compressor():
    assert parse_spec("random:tokens=64").budget == Budget(tokens=64)
    assert parse_spec("none:per_frame=8").budget == Budget(per_frame=8)
    assert parse_spec("avgpool").text == "avgpool:factor=2"
    assert parse_spec("none").text == "none"


def test_list_compressors_describes_names_aliases_stage_and_params(fake_compressor):
    infos = {info.name: info for info in list_compressors()}

    assert list(infos) == sorted(infos)
    assert {"none", "avgpool", "uniform", "random", "keepfirst"} <= set(infos)
    fake = infos["keepfirst"]
    assert fake.aliases == ("kf",)
    assert (fake.stage, fake.trainable) == ("pre_llm", False)
    assert fake.summary == "Keeps the first `count` tokens."
    assert fake.params[0] == ("count", "int", 1, "how many tokens to keep")
    assert [p.type for p in fake.params] == ["int", "float", "bool", "str"]


def test_unknown_compressor_error_lists_registered_names_and_aliases(fake_compressor):
    with pytest.raises(SpecError) as err:
        parse_spec("todo:ratio=0.1")
    message = str(err.value)
    assert "Unknown compressor 'todo'" in message
    for name in ("avgpool", "none", "random", "uniform", "keepfirst (alias kf)"):
        assert name in message


def test_unknown_parameter_error_lists_the_compressors_parameters(fake_compressor):
    with pytest.raises(SpecError) as err:
        parse_spec("keepfirst:cuont=3")
    message = str(err.value)
    assert "no parameter 'cuont'" in message
    assert "count (int), scale (float), verbose (bool), mode (str)" in message
    assert "ratio, tokens, per_frame" in message


@pytest.mark.parametrize(
    "text, message",
    [
        ("keepfirst:count=3.5", "'count' of compressor 'keepfirst' expects an int; got '3.5'"),
        ("keepfirst:scale=big", "'scale' of compressor 'keepfirst' expects a finite float"),
        ("keepfirst:scale=nan", "expects a finite float; got 'nan'"),
        ("keepfirst:verbose=maybe", "'verbose' of compressor 'keepfirst' expects a bool"),
        ("random:tokens=lots", "'tokens' of compressor 'random' expects an int; got 'lots'"),
        ("random:ratio=1.5", r"ratio must be a number in \(0, 1\]"),
        ("random:ratio=0.1,tokens=3", "at most one of ratio, tokens, per_frame"),
        ("avgpool:factor=0", "factor must be >= 1"),
    ],
)
def test_bad_values_raise_spec_error_naming_key_value_and_type(fake_compressor, text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        (":ratio=0.1", "no name"),
        ("a:b", "'b' is not of the form key=value"),
        ("a:=1", "'=1' has no key"),
        ("a:b=", "'b' has no value"),
        ("a:b=1,b=2", "gives parameter 'b' twice"),
        ("random:", "empty parameter"),
        ("random:ratio=0.1,", "empty parameter"),
    ],
)
def test_malformed_spec_strings_raise_spec_error_with_a_sentence(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


# ---------------------------------------------------------------- Baselines


def test_none_returns_tokens_unchanged_whatever_the_budget():
    tokens = make_tokens()
    ctx = CompressionContext(budget=Budget(tokens=1))
    out = parse_spec("none").compressor.compress(tokens, ctx)
    assert out is tokens


def test_avgpool_pools_each_frame_in_ceil_mode_like_avg_pool2d():
    tokens = make_tokens(t=2, h=5, w=7, d=3)

    out = parse_spec("avgpool:factor=2").compressor.compress(tokens, CompressionContext())

    assert len(out) == 2 * 3 * 4
    grid = tokens.embeds.reshape(2, 5, 7, 3).permute(0, 3, 1, 2)  # [T, D, H, W]
    pooled = F.avg_pool2d(grid, kernel_size=2, ceil_mode=True)  # [T, D, 3, 4], edges averaged
    torch.testing.assert_close(out.embeds, pooled.permute(0, 2, 3, 1).reshape(-1, 3))
    # Metadata and positions of each window's top-left token.
    assert out.grid_rc[:4].tolist() == [[0, 0], [0, 2], [0, 4], [0, 6]]
    assert out.grid_rc[4:8, 0].tolist() == [2, 2, 2, 2]
    assert out.frame_index.tolist() == [0] * 12 + [1] * 12
    assert out.positions[12, 0].item() == 35  # frame 1, row 0, col 0
    assert out.span_length == tokens.span_length


def test_avgpool_on_pruned_input_averages_the_tokens_each_window_still_has():
    tokens = make_tokens(t=1, h=2, w=2, d=3)
    pruned = tokens.select([1, 2, 3])  # drop the top-left token

    out = parse_spec("avgpool:factor=2").compressor.compress(pruned, CompressionContext())

    assert len(out) == 1
    torch.testing.assert_close(out.embeds[0], tokens.embeds[1:].mean(0))
    assert out.grid_rc[0].tolist() == [0, 1]


def test_uniform_with_every_keeps_frames_zero_k_2k():
    tokens = make_tokens(t=7, h=2, w=2)

    out = parse_spec("uniform:every=3").compressor.compress(tokens, CompressionContext())

    assert sorted(set(out.frame_index.tolist())) == [0, 3, 6]
    assert len(out) == 3 * 4
    assert torch.equal(out.positions[:, 0], tokens.positions[tokens.frame_index % 3 == 0, 0])


def test_uniform_without_every_spreads_the_budgeted_frames_evenly():
    tokens = make_tokens(t=8, h=2, w=2)
    spec = parse_spec("uniform:ratio=0.5")

    out = spec.compressor.compress(tokens, CompressionContext(budget=spec.budget))

    # 8 frames * 0.5 = 4 frames at rounded linspace(0, 7, 4) = 0, 2.33, 4.67, 7.
    assert sorted(set(out.frame_index.tolist())) == [0, 2, 5, 7]
    assert len(out) == 16
    spec_all = parse_spec("uniform")
    assert len(spec_all.compressor.compress(tokens, CompressionContext())) == len(tokens)


def test_random_keeps_exactly_budget_tokens_deterministic_under_seed():
    tokens = make_tokens(t=3, h=4, w=5, position_style="mrope")  # 60 tokens
    random = parse_spec("random").compressor

    a = random.compress(tokens, CompressionContext(budget=Budget(tokens=17), seed=1))
    b = random.compress(tokens, CompressionContext(budget=Budget(tokens=17), seed=1))
    c = random.compress(tokens, CompressionContext(budget=Budget(tokens=17), seed=2))

    assert len(a) == 17
    assert torch.equal(a.positions, b.positions) and torch.equal(a.embeds, b.embeds)
    assert not torch.equal(a.positions, c.positions)
    assert len(random.compress(tokens, CompressionContext(budget=Budget(ratio=0.1)))) == 6
    assert len(random.compress(tokens, CompressionContext(budget=Budget(per_frame=2)))) == 6


def test_random_survivors_keep_their_positions_frame_and_grid():
    tokens = make_tokens(t=3, h=4, w=5, position_style="mrope")
    out = parse_spec("random:tokens=10").compressor.compress(
        tokens, CompressionContext(budget=Budget(tokens=10), seed=3)
    )

    # Recover each survivor's original index from its embedding, then compare metadata.
    original = torch.cdist(out.embeds, tokens.embeds).argmin(dim=1)
    assert torch.equal(out.embeds, tokens.embeds[original])
    assert original.tolist() == sorted(original.tolist())  # original order kept
    assert torch.equal(out.positions, tokens.positions[original])
    assert torch.equal(out.frame_index, tokens.frame_index[original])
    assert torch.equal(out.grid_rc, tokens.grid_rc[original])
    assert torch.equal(out.timestamp_s, tokens.timestamp_s[original])


def test_baselines_are_registered_pre_llm_and_training_free():
    infos = {info.name: info for info in list_compressors()}
    for name in ("none", "avgpool", "uniform", "random"):
        assert (infos[name].stage, infos[name].trainable) == ("pre_llm", False)
