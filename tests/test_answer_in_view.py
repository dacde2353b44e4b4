"""eval.answer_in_view: which questions a compressor leaves answerable, and the accuracy on each side."""

from eval import shapesworld as sw
from eval.answer_in_view import breakdown, markdown
from vlm.model import VLM, VLMConfig


def test_every_answer_is_in_view_with_all_tokens_and_a_quarter_of_the_frames_hides_some(tmp_path):
    manifest = sw.cached_split("test", 6, tmp_path)
    model = VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=0)
    full = breakdown(model, manifest, "none")
    assert all(sides["hidden"]["questions"] == 0 for sides in full.values())
    for sides in full.values():  # with `none` on both columns, the two accuracies agree
        assert sides["shown"]["correct"] == sides["shown"]["correct_none"]
    quarter = breakdown(model, manifest, "uniform:every=4")
    assert {kind: sum(s["questions"] for s in sides.values()) for kind, sides in quarter.items()} == {
        kind: sides["shown"]["questions"] for kind, sides in full.items()}  # same questions, split
    # a fine-detail answer is hidden exactly when its dot shows in none of frames 0, 4, 8, 12
    dotless = 0
    for index in range(6):
        scene, questions = sw.scene_and_questions("test", index)
        dotless += sum(not scene.dot_visible[q.object_ids[0], ::4].any() for q in questions if q.type == "fine_detail")
    assert dotless > 0 and quarter["fine_detail"]["hidden"]["questions"] == dotless
    assert "| fine_detail |" in markdown("uniform:every=4", quarter)


def test_a_perfect_counter_gets_every_count_with_all_tokens_and_fewer_with_a_quarter(tmp_path):
    from eval.answer_in_view import ceiling_markdown, counted_filter, counting_ceiling

    manifest = sw.cached_split("test", 12, tmp_path)
    model = VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=0)
    full = counting_ceiling(model, manifest, "none")
    assert full["correct"] == full["questions"] >= 10
    tenth = counting_ceiling(model, manifest, "random:ratio=0.1")
    assert tenth["questions"] == full["questions"] and tenth["correct"] < full["correct"]
    assert "a perfect counter of the kept tokens gets" in ceiling_markdown("random:ratio=0.1", tenth)
    # the filter is read back from the generator's phrasing
    question = sw.Question("How many red objects appear in the video?", ("one", "two"), "one", "counting", (0,))
    assert counted_filter(question) == {"colour": "red"}
    question = sw.Question("How many circles appear in the video?", ("one", "two"), "one", "counting", (0,))
    assert counted_filter(question) == {"shape": "circle"}
