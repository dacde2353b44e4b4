"""eval.count_breakdown: the counting questions split by count, lifetime, view and taught tokens."""

import torch

from eval import shapesworld as sw
from eval.count_breakdown import breakdown, dropped_targets, markdown, verdict
from eval.train_tiny import count_targets, encode_pool, new_model, pool_tokens
from vlm.model import VLM, VLMConfig


def test_verdict_reads_over_and_under_counts_from_the_chosen_candidate():
    candidates = ["one", "three", "two", "four"]
    assert verdict("two", candidates, "two") == "right"
    assert verdict("three", candidates, "two") == "over"
    assert verdict("one", candidates, "two") == "under"
    assert verdict("six", candidates, "two") == "over"  # a number that is not a candidate
    assert verdict("purple", candidates, "two") == "other"


def test_every_counting_question_lands_once_in_each_split_and_none_drops_nothing(tmp_path):
    manifest = sw.cached_split("test", 10, tmp_path)
    counting = [q for i in range(10) for q in sw.scene_and_questions("test", i)[1] if q.type == "counting"]
    model = VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=0)
    full = breakdown(model, manifest, "none")
    for split in ("counted objects", "lives", "in view"):
        assert sum(cell["questions"] for cell in full[split].values()) == len(counting) >= 8
    assert set(full["in view"]) == {"shown"} and set(full["taught tokens dropped (in view)"]) == {"0"}
    for cell in full["counted objects"].values():  # the same answers on both sides
        assert cell["right"] == cell["none"]
        assert sum(cell[v] for v in ("right", "over", "under", "other")) == cell["questions"]
    assert {str(n) for n in {len(q.object_ids) for q in counting}} == set(full["counted objects"])
    tenth = breakdown(model, manifest, "random:ratio=0.1")
    dropped = tenth["taught tokens dropped (in view)"]
    assert "hidden" in tenth["in view"] and any(value != "0" for value in dropped)
    assert sum(cell["questions"] for cell in dropped.values()) == tenth["in view"]["shown"]["questions"]
    assert "| taught tokens dropped (in view) |" in markdown("random:ratio=0.1", tenth)


def test_dropped_targets_counts_the_objects_whose_taught_token_is_gone():
    model = new_model(0)
    pool = encode_pool(model, "train", 0, 6)
    checked = 0
    for index in range(len(pool)):
        tokens = pool_tokens(model, pool, index)
        for question in (q for q in pool.questions[index] if q.type == "counting" and q.object_ids):
            weights = count_targets(pool.facts[index], question, tokens)
            taught = weights > 0
            assert dropped_targets(pool.facts[index], question, tokens, tokens) == 0
            without = tokens.select(~taught)
            assert dropped_targets(pool.facts[index], question, tokens, without) == len(question.object_ids)
            # one taught token gone: the objects it stands for (two centres may share a token)
            first = int(torch.nonzero(taught)[0, 0])
            kept = tokens.select(torch.arange(len(tokens)) != first)
            assert dropped_targets(pool.facts[index], question, tokens, kept) == int(weights[first])
            checked += 1
    assert checked >= 3
