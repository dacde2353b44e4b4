"""The training recipe's pieces: packed question segments and per-patch perception targets."""

import numpy as np
import pytest
import torch

from compressors import CompressionContext, VisualTokens, parse_spec
from eval import shapesworld as sw
from eval.train_tiny import answer_loss, new_model, pack_clip, packed_answer_loss, patch_targets


def test_packed_questions_give_the_same_loss_as_one_sequence_per_question():
    model = new_model(0)
    clips, sequences = [], []
    for index in range(2):
        frames, questions = next(sw.iter_samples("train", index, 1))
        frames = frames[:3]
        with torch.no_grad():
            tokens = model.encode_frames(frames, np.arange(3) / 8.0)
        spec = parse_spec("random:ratio=0.5")
        kept = spec.compressor.compress(tokens, CompressionContext(budget=spec.budget, seed=index))
        answers = [model.tokenizer(q.answer, add_special_tokens=False).input_ids + [model.tokenizer.eos_token_id]
                   for q in questions[:3]]
        clips.append(pack_clip(model, kept, tokens.span_length, [q.text for q in questions[:3]], answers))
        for question, answer in zip(questions[:3], answers):
            prompt = model.prepare(kept, question.text, parse_spec("none"))
            sequences.append((prompt, answer))
    packed_loss, packed_accuracy = packed_answer_loss(model, clips)
    loss, accuracy = answer_loss(model, sequences)
    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=1e-5)
    assert packed_accuracy == accuracy


def test_patch_targets_mark_the_dot_colour_where_the_dot_is():
    scene, _ = sw.scene_and_questions("train", 0)
    frames, object_ids = sw.render_with_labels(scene)
    targets = patch_targets(scene, object_ids, 16)
    assert set(targets) == {"colour", "shape", "size", "dot", "quadrant", "motion", "appears", "centre"}
    t, row, col = map(int, np.argwhere(targets["dot"] > 0)[0])
    colour = sw.COLOURS[targets["dot"][t, row, col] - 1]
    patch = frames[t, 16 * row:16 * row + 16, 16 * col:16 * col + 16].reshape(-1, 3)
    assert ((patch == sw.COLOURS_RGB[colour]).all(-1)).sum() >= 4
    assert (targets["colour"] > 0).mean() > 0.05 and (targets["colour"] == 0).mean() > 0.3


def test_patch_targets_give_each_covered_patch_its_objects_quadrant_motion_and_novelty():
    checked = {"moving": 0, "new": 0}
    for index in range(12):
        scene, _ = sw.scene_and_questions("train", index)
        _, object_ids = sw.render_with_labels(scene)
        targets = patch_targets(scene, object_ids, 16)
        for obj in scene.objects:
            for t in np.flatnonzero(scene.seen(obj.object_id)):
                own = (object_ids[t] == obj.object_id).reshape(8, 16, 8, 16).sum(axis=(1, 3)) >= 128
                if not own.any():  # no patch mostly this object's
                    continue
                quadrant = sw.QUADRANTS[targets["quadrant"][t][own][0] - 1]
                assert quadrant == sw.quadrant_of(scene, obj.object_id, int(t))
                motion, appears = targets["motion"][t][own], targets["appears"][t][own]
                if t == 0:  # no frame before: nothing to learn
                    assert (motion == 0).all() and (appears == 0).all()
                elif scene.present[obj.object_id, t - 1]:
                    assert (motion == sw.DIRECTIONS.index(obj.direction) + 1).all() and (appears == 1).all()
                    checked["moving"] += obj.direction != "still"
                else:  # it appeared in this frame: new, and no direction to read yet
                    assert (motion == 0).all() and (appears == 2).all()
                    checked["new"] += 1
        assert ((targets["quadrant"] > 0) == (targets["colour"] > 0)).all()
    assert checked["moving"] > 20 and checked["new"] > 2


def test_patch_targets_mark_the_one_patch_that_holds_each_visible_objects_centre():
    checked = 0
    for index in range(8):
        scene, _ = sw.scene_and_questions("train", index)
        _, object_ids = sw.render_with_labels(scene)
        targets = patch_targets(scene, object_ids, 16)
        centre = targets["centre"]
        assert ((centre > 0) == (targets["colour"] > 0)).all()  # labelled on covered patches only
        for t in range(scene.config.frame_count):
            holders = []
            for obj in scene.objects:
                if not scene.present[obj.object_id, t]:
                    continue
                x_px, y_px = scene.centres_px[obj.object_id, t]
                row, col = int(y_px) // 16, int(x_px) // 16
                if 0 <= row < 8 and 0 <= col < 8 and (object_ids[t, row * 16:row * 16 + 16, col * 16:col * 16 + 16]
                                                      == obj.object_id).sum() >= 16:
                    holders.append((row, col))
            for row, col in holders:
                checked += centre[t, row, col] == 2
            assert (centre[t] == 2).sum() <= len(holders)  # never a patch that holds no centre
    assert checked > 50


def test_count_targets_weigh_one_token_per_counted_object_and_sum_to_the_count():
    from eval.train_tiny import FACT_COUNT, count_targets, encode_pool, kept_cells, pool_tokens, token_owners

    model = new_model(0)
    pool = encode_pool(model, "train", 0, 10, moment_counts=True)  # whole-clip counts and v2's at a moment
    checked, dropped, moments = 0, 0, 0
    for index in range(len(pool)):
        tokens = pool_tokens(model, pool, index)
        for question in pool.questions[index]:
            weights = count_targets(pool.facts[index], question, tokens)
            if question.type != "counting":
                assert weights is None
                continue
            assert weights is not None and int(weights.sum()) == sw.NUMBER_WORDS.index(question.answer)
            # each weighted token shows a counted object (owners), in the named frame if any
            shown = pool.owners[index][tokens.frame_index, tokens.grid_rc[:, 0], tokens.grid_rc[:, 1]].long()
            bits = sum(1 << i for i in question.object_ids)
            on = weights > 0
            assert ((shown[on] & bits) != 0).all()
            if question.frame_index is not None:
                assert (tokens.frame_index[on] == question.frame_index).all()
                moments += 1
            checked += 1
            if on.any():  # without `present`, a compressor that drops one of them leaves the count head untaught
                kept = tokens.select(~on)
                assert count_targets(pool.facts[index], question, kept) is None
                # with it, each object moves to another of its kept tokens: in the same frame if
                # it shows there, else a later one; never to a token that does not show it
                present = token_owners(kept, pool.owners[index])
                moved = count_targets(pool.facts[index], question, kept, present)
                if moved is None:
                    continue
                assert int(moved.sum()) == len(question.object_ids)
                facts, cells = pool.facts[index], kept_cells(kept)
                for object_id in question.object_ids:
                    # its token: where it shows (its centre, or a token it covers) in its earliest
                    # kept frame, which is the question's frame if it names one
                    centres = facts[object_id, FACT_COUNT + 16:FACT_COUNT + 32].long()
                    centre_at = centres[kept.frame_index]
                    at_centre = (centre_at >= 0) & (cells == kept.frame_index * 16 + centre_at)
                    shows = ((present >> object_id) & 1).bool() | at_centre
                    if question.frame_index is not None:
                        shows &= kept.frame_index == question.frame_index
                    first = kept.frame_index[shows].min()
                    assert moved[shows & (kept.frame_index == first)].sum() >= 1
                dropped += 1
    assert checked >= 8 and dropped >= 5 and moments >= 2


def test_temporal_questions_are_taught_only_where_the_kept_tokens_show_the_order():
    from eval.train_tiny import encode_pool, order_is_kept, pool_tokens, token_owners

    model = new_model(0)
    pool = encode_pool(model, "train", 0, 30)
    shown, hidden = 0, 0
    for index in range(len(pool)):
        tokens = pool_tokens(model, pool, index)
        kept = tokens.select(tokens.frame_index % 4 == 0)
        for question in pool.questions[index]:
            if question.type != "temporal_order":
                continue
            assert order_is_kept(question, tokens, token_owners(tokens, pool.owners[index]))  # all frames show it
            event, earliest = sw.temporal_event(question)
            times = [getattr(pool_scene(index).objects[i], event) for i in question.object_ids]
            seen = [[t for t in range(0, 16, 4) if pool_scene(index).present[i, t]] for i in question.object_ids]
            if not all(seen):  # an option between kept frames: the order is not shown
                assert not order_is_kept(question, kept, token_owners(kept, pool.owners[index]))
                hidden += 1
            elif order_is_kept(question, kept, token_owners(kept, pool.owners[index])):
                shown += 1  # and then the kept frames order the options as the scene does
                first = [min(s) if event == "first_frame" else max(s) for s in seen]
                assert (first[0] < min(first[1:])) == earliest and (times[0] < min(times[1:])) == earliest
    assert shown >= 5 and hidden >= 3


def pool_scene(index: int) -> sw.Scene:
    return sw.scene_and_questions("train", index)[0]


def test_count_head_is_taught_the_sink_and_one_token_per_object_and_the_readout_the_count():
    from eval.train_tiny import (BINDING_LAYER, COUNT_HEAD, ObjectReadout, binding_attention, binding_loss,
                                 head_scores, packed_logits)

    model = new_model(0)
    tokens, texts, answers = sample_prompt(model, 2)
    counts = [torch.zeros(len(tokens)), torch.zeros(len(tokens))]
    counts[0][[3, 9]] = 1.0
    counts[0][12] = 2.0  # two centres in one token: four objects
    readout = ObjectReadout(binding_attention(model).head_dim)
    with torch.no_grad():
        clip = pack_clip(model, tokens, tokens.span_length, texts, answers)
        clip.count_targets = counts
        parts: dict = {}
        plain, _ = packed_answer_loss(model, [clip], binding=True)
        weighted, _ = packed_answer_loss(model, [clip], binding=True, readout=readout, readout_weight=0.5,
                                         count_weight=2.0, parts=parts)
        capture = {}
        packed_logits(model, [clip], capture)
        assert "count" not in binding_loss(model, [clip], capture)
        terms = binding_loss(model, [clip], capture, readout=readout, count=True)
        # by hand: cross-entropy to (sink 1, token weights) / (1 + count) over [sink, visual tokens]
        attention = binding_attention(model)
        hidden, (cos, sin) = capture[BINDING_LAYER]
        start, end = clip.visual_span
        scores = head_scores(attention, COUNT_HEAD, hidden[0], cos[0], sin[0], torch.tensor(clip.first_answer_at),
                             slice(start - 1, end))
        target = torch.cat([torch.ones(2, 1), torch.stack(counts)], dim=1)
        target = target / target.sum(-1, keepdim=True)
        expected = -(target * scores.log_softmax(-1)).sum(-1).mean()
        hd = attention.head_dim
        kv = COUNT_HEAD // (attention.config.num_attention_heads // attention.config.num_key_value_heads)
        values = attention.v_proj(hidden[0, start - 1:end])[:, kv * hd:(kv + 1) * hd]
        named = torch.nn.functional.cross_entropy(readout.count(scores.softmax(-1) @ values), torch.tensor([4, 0]))
    torch.testing.assert_close(terms["count"], expected)
    torch.testing.assert_close(terms["count_readout"], named)
    torch.testing.assert_close(weighted - plain, 2.0 * expected + 0.5 * named)
    assert set(parts) == {"answer", "count", "count_readout"}  # no object targets given
    with pytest.raises(ValueError, match="look heads"):
        packed_answer_loss(model, [clip], binding=True, look_weight=1.0, count_weight=1.0)


def test_binding_masks_point_at_the_tokens_that_show_the_question_objects():
    from eval.train_tiny import binding_masks, render_clip

    frames, questions, owners = render_clip("train", 3, 32)
    scene, _ = sw.scene_and_questions("train", 3)
    _, object_ids = sw.render_with_labels(scene)
    model = new_model(0)
    with torch.no_grad():
        tokens = model.encode_frames(frames, np.arange(len(frames)) / 8.0)
    spec = parse_spec("random:ratio=0.5")
    kept = spec.compressor.compress(tokens, CompressionContext(budget=spec.budget, seed=0))
    masks = binding_masks(kept, torch.from_numpy(owners), questions)
    assert len(masks) == len(questions)
    for question, mask in zip(questions, masks):
        assert mask.shape == (len(kept),) and mask.dtype == torch.bool
        for i in range(len(kept)):  # a token is a target iff one of the question's objects covers its 32 px block
            t, row, col = int(kept.frame_index[i]), *map(int, kept.grid_rc[i])
            block = object_ids[t, 32 * row:32 * row + 32, 32 * col:32 * col + 32]
            shows = any((block == obj).sum() >= 16 for obj in question.object_ids)
            in_frame = question.frame_index is None or question.frame_index == t
            assert bool(mask[i]) == (shows and in_frame)
    assert any(mask.any() for mask in masks)


def test_look_masks_point_at_the_object_in_the_first_and_last_kept_frames_that_show_it():
    from eval.train_tiny import binding_masks, look_masks, render_clip

    frames, questions, owners = render_clip("train", 5, 32)
    model = new_model(0)
    with torch.no_grad():
        tokens = model.encode_frames(frames, np.arange(len(frames)) / 8.0)
    spec = parse_spec("random:ratio=0.5")
    kept = spec.compressor.compress(tokens, CompressionContext(budget=spec.budget, seed=1))
    owners = torch.from_numpy(owners)
    looks = look_masks(kept, owners, questions)
    assert len(looks) == len(questions)
    checked = 0
    for question, look in zip(questions, looks):
        if len(question.object_ids) != 1:
            assert look is None
            continue
        whole = binding_masks(kept, owners, [sw.Question(question.text, question.candidates, question.answer,
                                                         question.type, question.object_ids)])[0]
        first, last = look
        shown_in = kept.frame_index[whole]
        assert set(kept.frame_index[first].tolist()) == {int(shown_in.min())}
        assert set(kept.frame_index[last].tolist()) == {int(shown_in.max())}
        assert (first <= whole).all() and (last <= whole).all()  # only the object's tokens
        assert first.sum() == (whole & (kept.frame_index == shown_in.min())).sum()
        checked += 1
    assert checked >= 3


def sample_prompt(model, questions: int):
    """Two frames of a ShapesWorld sample through `model`, with the texts and answer ids of its
    first `questions` questions: what the binding tests pack."""
    frames, asked = next(sw.iter_samples("train", 0, 1))
    with torch.no_grad():
        tokens = model.encode_frames(frames[:2], np.arange(2) / 8.0)
    answers = [model.tokenizer(q.answer, add_special_tokens=False).input_ids + [model.tokenizer.eos_token_id]
               for q in asked[:questions]]
    return tokens, [q.text for q in asked[:questions]], answers


def test_head_scores_are_the_attention_the_lm_computes():
    """The supervised heads' logits (binding_loss) are those of the LM's own attention: the
    softmax of head_scores matches HF's eager attention weights for every head."""
    from eval.train_tiny import BINDING_LAYER, binding_attention, head_scores, packed_logits

    model = new_model(0)
    tokens, texts, answers = sample_prompt(model, 1)
    with torch.no_grad():
        clip = pack_clip(model, tokens, tokens.span_length, texts, answers)
        capture = {}
        packed_logits(model, [clip], capture)
        model.lm.set_attn_implementation("eager")
        weights = model.lm(inputs_embeds=clip.embeds[None], position_ids=clip.positions[None],
                           output_attentions=True).attentions[BINDING_LAYER][0]  # [H, L, L]
        at = clip.first_answer_at[0]
        hidden, (cos, sin) = capture[BINDING_LAYER][0][0], capture[BINDING_LAYER][1]
        for head in range(weights.shape[0]):
            scores = head_scores(binding_attention(model), head, hidden, cos[0], sin[0], torch.tensor([at]),
                                 slice(0, at + 1))
            torch.testing.assert_close(scores.softmax(-1)[0], weights[head, at, :at + 1], atol=1e-5, rtol=1e-4)


def test_binding_loss_is_low_when_the_head_already_attends_to_the_targets():
    """The loss is -log(attention mass on the targets): all mass on them gives ~0, and the
    loss grows as targets get fewer of the head's attention."""
    from eval.train_tiny import BINDING_LAYER, binding_loss, packed_logits

    model = new_model(0)
    tokens, texts, answers = sample_prompt(model, 2)
    everything = [torch.ones(len(tokens), dtype=torch.bool)] * 2
    one = [torch.nn.functional.one_hot(torch.tensor(3), len(tokens)).bool()] * 2
    losses = []
    for targets in (everything, one):  # the object head and both look heads
        looks = [(t, t) for t in targets]
        clip = pack_clip(model, tokens, tokens.span_length, texts, answers, targets, looks)
        capture = {}
        packed_logits(model, [clip], capture)
        assert capture[BINDING_LAYER][0].shape[1] == len(clip.embeds) and BINDING_LAYER < len(model.lm.model.layers)
        losses.append({kind: float(value.detach()) for kind, value in binding_loss(model, [clip], capture).items()})
    for kind in ("object", "look"):
        assert losses[0][kind] < 1e-5 < losses[1][kind]
        assert abs(losses[1][kind] - np.log(len(tokens))) < 1.0  # a fresh head spreads its attention


def test_look_heads_add_to_the_loss_only_when_asked():
    from eval.train_tiny import binding_loss, packed_answer_loss, packed_logits

    model = new_model(0)
    tokens, texts, answers = sample_prompt(model, 2)
    with torch.no_grad():
        one = [torch.nn.functional.one_hot(torch.tensor(3), len(tokens)).bool()] * 2
        clip = pack_clip(model, tokens, tokens.span_length, texts, answers, one, [(t, t) for t in one])
        plain, _ = packed_answer_loss(model, [clip], binding=True)
        with_looks, _ = packed_answer_loss(model, [clip], binding=True, look_weight=0.5)
        capture = {}
        packed_logits(model, [clip], capture)
        assert set(binding_loss(model, [clip], capture, looks=False)) == {"object"}
        look = binding_loss(model, [clip], capture)["look"]
    torch.testing.assert_close(with_looks - plain, 0.5 * look)
    assert look > 1.0


def test_naming_targets_are_the_question_words_that_name_its_objects():
    model = new_model(0)
    tokens, _, answers = sample_prompt(model, 1)
    texts = ["What colour is the dot on the big white object?", "How many objects are there in the video?",
             "Where is the circle at the end?"]
    clip = pack_clip(model, tokens, tokens.span_length, texts, answers * 3)
    words = []
    for (start, on), at in zip(clip.naming_targets, clip.first_answer_at):
        assert len(on) == at + 1 - start  # the question's tokens up to the answer position
        _, suffix_ids = model._prompt_ids(texts[len(words)])
        words.append([model.tokenizer.decode([int(i)]) for i in suffix_ids[on]])
    assert words == [["big", "white"], [], ["circle"]]


def weighted_head_term(model, clip, kind: str, weight: float):
    """A supervised head's term (`binding_loss(..., kind=True)[kind]`, after checking it is left
    out without the flag), the weighted loss minus the plain one, the parts, and the captured
    layer inputs; `kind` is "query" or "identity"."""
    from eval.train_tiny import binding_loss, packed_logits

    with torch.no_grad():
        parts: dict = {}
        plain, _ = packed_answer_loss(model, [clip], binding=True)
        weighted, _ = packed_answer_loss(model, [clip], binding=True, parts=parts, **{f"{kind}_weight": weight})
        capture = {}
        packed_logits(model, [clip], capture)
        assert kind not in binding_loss(model, [clip], capture)
        term = binding_loss(model, [clip], capture, **{kind: True})[kind]
    return term, weighted - plain, parts, capture


def test_naming_head_adds_its_term_only_when_weighted():
    from eval.train_tiny import QUERY_HEAD, QUERY_LAYER, head_scores

    model = new_model(0)
    tokens, texts, answers = sample_prompt(model, 2)
    one = [torch.nn.functional.one_hot(torch.tensor(3), len(tokens)).bool()] * 2
    clip = pack_clip(model, tokens, tokens.span_length, texts, answers, one)
    query, added, parts, capture = weighted_head_term(model, clip, "query", 2.0)
    with torch.no_grad():
        # by hand: -log of the naming head's softmax mass on the naming words, mean over questions
        hidden, (cos, sin) = capture[QUERY_LAYER]
        expected = []
        for at, (start, on) in zip(clip.first_answer_at, clip.naming_targets):
            if on.any():
                scores = head_scores(model.lm.model.layers[QUERY_LAYER].self_attn, QUERY_HEAD, hidden[0], cos[0],
                                     sin[0], torch.tensor([at]), slice(start, at + 1))[0]
                expected.append(-torch.log(scores.softmax(-1)[on].sum()))
    assert expected, "the sample's questions name their objects"
    torch.testing.assert_close(query, torch.stack(expected).mean())
    torch.testing.assert_close(added, 2.0 * query)
    assert set(parts) == {"answer", "object", "query"} and abs(parts["query"] - float(query)) < 1e-5


def test_readout_targets_are_the_scene_facts_of_the_question_object():
    """Each question about one object is taught its object's colour, shape, size, dot and
    direction as the scene has them, and its quadrant in the frame the question names; the
    dot's colour only while the kept tokens show the dot."""
    from eval.train_tiny import DOT_FACT, FACT_COUNT, FACTS, object_facts, readout_targets

    every_token = VisualTokens.from_grid(torch.zeros(16, 4, 4, 8), np.arange(16) / 8)  # 32 px tokens
    checked = {"frame": 0, "no frame": 0, "several": 0, "dot hidden": 0}
    for index in range(12):
        scene, questions = sw.scene_and_questions("train", index)
        facts = torch.from_numpy(object_facts(scene, 32))
        assert (facts[len(scene.objects):] == -1).all()
        for question in questions:
            targets = readout_targets(facts, question, every_token)
            if len(question.object_ids) != 1:
                assert targets is None
                checked["several"] += 1
                continue
            obj = scene.objects[question.object_ids[0]]
            named = [values[i] for (_, values), i in zip(FACTS, targets[:FACT_COUNT].tolist())]
            assert named == [obj.colour, obj.shape, obj.size, obj.dot_colour, obj.direction]
            if obj.dot_colour is not None:  # without the frames of its flash, the dot is not taught
                flash = torch.from_numpy(scene.dot_visible[obj.object_id])[every_token.frame_index]
                hidden = readout_targets(facts, question, every_token.select(~flash))
                assert hidden[DOT_FACT] == -100 and torch.equal(hidden[:DOT_FACT], targets[:DOT_FACT])
                checked["dot hidden"] += 1
            if question.frame_index is None:
                assert targets[FACT_COUNT] == -100
                checked["no frame"] += 1
            else:
                quadrant = sw.QUADRANTS[int(targets[FACT_COUNT])]
                assert quadrant == sw.quadrant_of(scene, obj.object_id, question.frame_index)
                if question.type == "position":
                    assert quadrant == question.answer
                checked["frame"] += 1
    assert min(checked.values()) >= 5


def test_object_readout_reads_the_object_head_output_and_adds_only_when_weighted():
    """The readout term is the cross-entropy of a linear readout of the object head's output
    (its softmax over the visual tokens times their values), each fact averaged over the
    questions that teach it, then over facts."""
    from eval.train_tiny import (BINDING_LAYER, OBJECT_HEAD, ObjectReadout, binding_attention, binding_loss,
                                 head_scores, packed_logits)

    model = new_model(0)
    tokens, texts, answers = sample_prompt(model, 3)
    one = [torch.nn.functional.one_hot(torch.tensor(i), len(tokens)).bool() for i in (3, 5, 7)]
    facts = [torch.tensor([1, 2, 0, 3, 4, 2]), None, torch.tensor([5, 2, 1, 0, 0, -100])]
    readout = ObjectReadout(binding_attention(model).head_dim)
    with torch.no_grad():
        clip = pack_clip(model, tokens, tokens.span_length, texts, answers, one)
        clip.readout_targets = facts
        parts: dict = {}
        plain, _ = packed_answer_loss(model, [clip], binding=True, readout=readout)
        weighted, _ = packed_answer_loss(model, [clip], binding=True, readout=readout, readout_weight=0.5,
                                         parts=parts)
        capture = {}
        packed_logits(model, [clip], capture)
        assert "readout" not in binding_loss(model, [clip], capture)
        term = binding_loss(model, [clip], capture, readout=readout)["readout"]
        # by hand
        attention = binding_attention(model)
        hidden, (cos, sin) = capture[BINDING_LAYER]
        start, end = clip.visual_span
        hd = attention.head_dim
        kv = OBJECT_HEAD // (attention.config.num_attention_heads // attention.config.num_key_value_heads)
        values = attention.v_proj(hidden[0, start:end])[:, kv * hd:(kv + 1) * hd]
        at = torch.tensor([clip.first_answer_at[0], clip.first_answer_at[2]])
        outputs = head_scores(attention, OBJECT_HEAD, hidden[0], cos[0], sin[0], at, slice(start, end)).softmax(-1) @ values
        logits = readout.linear(outputs).split(readout.sizes, dim=-1)
        targets = torch.stack([facts[0], facts[2]])
        expected = [torch.nn.functional.cross_entropy(part, targets[:, i]) for i, part in enumerate(logits[:5])]
        expected.append(torch.nn.functional.cross_entropy(logits[5][:1], targets[:1, 5]))  # one quadrant taught
    torch.testing.assert_close(term, torch.stack(expected).mean())
    torch.testing.assert_close(plain, packed_answer_loss(model, [clip], binding=True)[0])
    torch.testing.assert_close(weighted - plain, 0.5 * term)
    assert abs(parts["readout"] - float(term)) < 1e-5


def test_cached_pool_is_the_pool_encoded_again(tmp_path):
    from eval.train_tiny import encode_pool, encode_pool_cached

    model = new_model(0)
    fresh = encode_pool(model, "val", 5, 2)
    first = encode_pool_cached(model, "val", 5, 2, cache=tmp_path)
    assert len(list(tmp_path.glob("pool-val-2-*.pt"))) == 1
    again = encode_pool_cached(model, "val", 5, 2, cache=tmp_path)
    for pool in (first, again):
        torch.testing.assert_close(pool.features, fresh.features)
        assert torch.equal(pool.owners, fresh.owners) and pool.questions == fresh.questions
        assert torch.equal(pool.facts, fresh.facts)
    with torch.no_grad():
        next(model.encoder.parameters()).add_(1.0)
    encode_pool_cached(model, "val", 5, 2, cache=tmp_path)  # another tower: its own file
    assert len(list(tmp_path.glob("pool-val-2-*.pt"))) == 2


def test_fine_detail_and_temporal_order_are_asked_only_where_the_kept_tokens_show_the_answer():
    from eval.train_tiny import dot_is_kept, encode_pool, order_is_kept, packed_from_pool, pool_tokens, token_owners

    model = new_model(0)
    pool = encode_pool(model, "train", 0, 6)
    uniform = parse_spec("uniform:every=4")
    checked = {"kept": 0, "lost": 0}
    for index in range(len(pool)):
        tokens = pool_tokens(model, pool, index)
        kept = uniform.compressor.compress(tokens, CompressionContext(budget=uniform.budget, seed=index, model=model))
        clip = packed_from_pool(model, pool, index, uniform, seed=index)
        every = packed_from_pool(model, pool, index, uniform, seed=index, every_question=True)
        assert len(every.first_answer_at) == len(pool.questions[index])
        fine = [q for q in pool.questions[index] if q.type == "fine_detail"]
        for question in fine:
            assert dot_is_kept(pool.facts[index], question.object_ids[0], tokens)  # all tokens show every dot
            checked["kept" if dot_is_kept(pool.facts[index], question.object_ids[0], kept) else "lost"] += 1
        present = token_owners(kept, pool.owners[index])
        lost = sum(not dot_is_kept(pool.facts[index], q.object_ids[0], kept) for q in fine)
        lost += sum(q.type == "temporal_order" and not order_is_kept(q, kept, present) for q in pool.questions[index])
        assert (0 if clip is None else len(clip.first_answer_at)) == len(pool.questions[index]) - lost
        # stage 3 asks temporal order only where every token is kept (ROBUST_WHOLE_ONLY_TYPES)
        whole_only = frozenset({"temporal_order"})
        skipped = packed_from_pool(model, pool, index, uniform, seed=index, whole_only_types=whole_only)
        temporal = sum(q.type == "temporal_order" and order_is_kept(q, kept, present) for q in pool.questions[index])
        assert (0 if skipped is None else len(skipped.first_answer_at)) == len(pool.questions[index]) - lost - temporal
        whole = packed_from_pool(model, pool, index, parse_spec("none"), seed=index, whole_only_types=whole_only)
        assert len(whole.first_answer_at) == len(pool.questions[index])
        checked["temporal"] = checked.get("temporal", 0) + temporal
    assert min(checked.values()) >= 1


def test_curriculum_keeps_the_chosen_frames_and_only_questions_they_answer():
    from eval.train_tiny import FRAME_LOCAL_TYPES, encode_pool, frames_at, packed_from_pool

    assert [frames_at(((2, 1), (3, 4)), step) for step in range(1, 8)] == [1, 1, 4, 4, 4, None, None]
    model = new_model(0)
    pool = encode_pool(model, "train", 0, 2)
    none = parse_spec("none")
    whole = packed_from_pool(model, pool, 0, none, seed=0)
    assert whole.visual_span[1] - whole.visual_span[0] == pool.features.shape[1] * 16  # 16 merged tokens a frame
    assert len(whole.first_answer_at) == len(pool.questions[0])
    asked = 0
    for seed in range(6):
        clip = packed_from_pool(model, pool, 0, none, seed=seed, frames=1)
        if clip is None:
            continue
        start, end = clip.visual_span
        assert end - start == 16  # one frame's tokens
        frame = (clip.positions[start] - start) // 16  # tokens keep their original positions
        assert ((clip.positions[start:end] - start) // 16 == frame).all()
        assert 0 < len(clip.first_answer_at) < len(pool.questions[0])
        for targets in clip.binding_targets:
            assert targets.shape == (16,) and targets.any()  # each kept question's object is in view
        asked += len(clip.first_answer_at)
    assert asked > 0
    local = [q for q in pool.questions[0] if q.type in FRAME_LOCAL_TYPES]
    assert local and len(local) < len(pool.questions[0])


@pytest.mark.slow
def test_binding_probe_learns_to_find_the_named_object_among_short_clips():
    """The synthetic binding probe (eval.probe_binding): with binding supervision, the LM and
    the packing/binding machinery learn to answer about the named object among 16 tokens."""
    from eval.probe_binding import run_probe

    accuracies = run_probe([(1, 250)], "linear", binding=True, clips_per_step=16, report=lambda line: None)
    assert np.mean(accuracies[:20]) < 0.4  # chance is 1/5 to start
    assert np.mean(accuracies[-20:]) > 0.9


def test_projector_content_is_unit_rms_whatever_the_feature_scale():
    """Visual tokens are not dwarfed by what the LM adds to them: the projector's content part
    leaves it at unit RMS per token (a LayerNorm), and the fixed where/when embeddings are small."""
    from vlm.projector import WHERE_WHEN_SCALE

    projector = new_model(0).projector
    for scale in (0.1, 1.0, 100.0):
        features = scale * torch.randn(2, 8, 8, projector.patch[0].in_features)
        content = projector.content(features)
        rms = content.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-2, rtol=0)
        where_when = projector(features) - content
        torch.testing.assert_close(where_when.pow(2).mean(-1).sqrt(),
                                   torch.full_like(rms, WHERE_WHEN_SCALE / 2 ** 0.5), atol=1e-4, rtol=0)


def test_projector_merges_a_bag_of_patches_and_tells_tokens_apart_by_place():
    """A merged token is the same whatever sub-patch of its block an object falls in (so an
    object that straddles tokens looks alike in each), and each token's place is added to it."""
    projector = new_model(0).projector
    width = projector.patch[0].in_features
    torch.manual_seed(0)
    thing = torch.randn(width)
    tokens = []
    for row, col in ((0, 0), (0, 1), (1, 0), (1, 1)):  # the same feature in each patch of block (0, 0)
        features = torch.zeros(1, 4, 4, width)
        features[0, row, col] = thing
        tokens.append(projector.content(features)[0, 0, 0])
    for token in tokens[1:]:
        torch.testing.assert_close(token, tokens[0])
    elsewhere = torch.zeros(1, 4, 4, width)
    elsewhere[0, 2, 2] = thing  # block (1, 1)
    torch.testing.assert_close(projector.content(elsewhere)[0, 1, 1], tokens[0])
    placed = projector(elsewhere)
    assert not torch.allclose(placed[0, 1, 1], placed[0, 0, 0])
    later = projector(elsewhere, frame_index=torch.tensor([5]))
    assert not torch.allclose(later[0, 1, 1], placed[0, 1, 1])


def test_curriculum_flag_parses_stages_and_names_a_bad_one():
    import argparse

    from server.cli import parse_curriculum

    assert parse_curriculum("1500:1,500:2") == ((1500, 1), (500, 2))
    assert parse_curriculum("none") == ()
    for bad in ("3:x", "3", "0:1", "5:1,,"):
        with pytest.raises(argparse.ArgumentTypeError, match="STEPS:FRAMES"):
            parse_curriculum(bad)
    from server.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "tiny", "--out", "x"]).look_weight == 0.0
    assert parser.parse_args(["train", "tiny", "--out", "x", "--look-weight", "0.5"]).look_weight == 0.5
    for bad in ("-1", "nan", "heavy"):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "tiny", "--out", "x", "--look-weight", bad])


def test_train_flags_become_the_config_a_checkpoint_records():
    import json
    from dataclasses import asdict

    from eval.train_tiny import TrainConfig
    from server.cli import build_parser, train_config

    parser = build_parser()
    assert train_config(parser.parse_args(["train", "tiny", "--out", "x"])) == TrainConfig()
    config = train_config(parser.parse_args(["train", "tiny", "--out", "x", "--query-weight", "0", "--place-scale",
                                             "1", "--time-scale", "0.5", "--pool-cache", "runs/pools",
                                             "--readout-weight", "0"]))
    assert (config.query_weight, config.place_scale, config.time_scale, config.pool_cache) == (0.0, 1.0, 0.5,
                                                                                             "runs/pools")
    assert config.readout_weight == 0.0 and TrainConfig().readout_weight > 0
    stage3 = train_config(parser.parse_args(["train", "tiny", "--out", "x", "--qa-from", "runs/r", "--robust-steps",
                                             "10", "--robust-lr", "2e-4", "--identity-weight", "0",
                                             "--no-moment-counts"]))
    assert (stage3.qa_from, stage3.robust_steps, stage3.robust_lr, stage3.identity_weight) == ("runs/r", 10, 2e-4, 0.0)
    assert not stage3.moment_counts and TrainConfig().moment_counts
    assert TrainConfig().robust_lr == 5e-4
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "tiny", "--out", "x", "--robust-lr", "-1"])
    assert TrainConfig().robust_steps == 1500 and TrainConfig().qa_from is None and TrainConfig().identity_weight > 0  # the shipped recipe (run AA): stages 1-3
    looks = train_config(parser.parse_args(["train", "tiny", "--out", "x", "--look-weight", "1"]))
    assert looks.look_weight == 1.0 and looks.count_weight == 0.0  # the same heads: the look heads win
    json.dumps(asdict(config))  # saved beside every checkpoint (model.config.notes)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "tiny", "--out", "x", "--place-scale", "-1"])


def test_head_probe_reads_a_signal_the_outputs_carry_and_not_one_they_lack():
    from eval.probe_heads import readable

    generator = torch.Generator().manual_seed(0)
    answers = torch.randint(0, 4, (400,), generator=generator) + 10  # word ids, not 0..3
    carried = torch.nn.functional.one_hot(answers - 10, 4).float() + 0.3 * torch.randn(400, 4, generator=generator)
    noise = torch.randn(400, 4, generator=generator)
    assert readable(torch.cat([carried, noise], 1), answers) > 0.9
    assert readable(noise, answers) < 0.45


def test_head_probe_covers_every_question_of_the_clips_read():
    from eval.probe_heads import head_outputs
    from eval.train_tiny import encode_pool

    model = new_model(0)
    pool = encode_pool(model, "train", 0, 2)
    found = head_outputs(model, pool, 2)
    assert sum(len(record["answer"]) for record in found.values()) == sum(len(q) for q in pool.questions)
    for record in found.values():
        assert len(record["output"]) == len(record["right"]) == len(record["answer"])
        assert all(value <= 0.0 for value in record["log_mass"])  # log of a mass in (0, 1]


def test_a_tower_saved_before_motion_input_still_starts_qa_training(tmp_path):
    """model_on_tower builds the tower its folder's config describes: a three-channel tower
    trained before the preset read motion keeps working with --perception-from."""
    from eval.probe_binding import PROBE_TOWER
    from eval.train_tiny import model_on_tower

    old = new_model(0, vision=PROBE_TOWER)
    old.save_pretrained(tmp_path)
    model = model_on_tower(tmp_path, seed=1)
    assert not model.encoder.motion_input and model.encoder.visual.conv1[0].in_channels == 3
    for name, value in old.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[name], value, rtol=0, atol=0)
    assert new_model(0).encoder.visual.conv1[0].in_channels == 6  # the recipe's tower reads motion


@pytest.mark.slow
def test_stage_three_from_a_saved_model_continues_the_run_bit_for_bit(tmp_path):
    """`--qa-from` (stage 3 on a saved stage-2 model) gives the weights the whole run gives:
    the shipped model is trained that way, and its from-scratch reproduction is the whole run."""
    import json

    from safetensors.torch import load_file

    from eval.train_tiny import QA_FIRST_CLIP, TrainConfig, train_tiny

    small = dict(perception_steps=2, perception_clips_per_step=1, qa_pool_clips=6, qa_steps=3, qa_clips_per_step=2,
                 curriculum=(), eval_every=100, eval_clips=2, workers=0, robust_steps=3)
    # stage 2 counts at a moment on some of these clips too (TrainConfig.moment_counts), stage 3 never
    assert TrainConfig().moment_counts
    assert any(q.type == "counting" and q.frame_index is not None for i in range(6)
               for q in sw.scene_and_questions("train", QA_FIRST_CLIP + i, moment_counts=True)[1])
    train_tiny(tmp_path / "whole", TrainConfig(**small), report=lambda line: None)
    train_tiny(tmp_path / "stage2", TrainConfig(**{**small, "robust_steps": 0}), report=lambda line: None)
    train_tiny(tmp_path / "stage3", TrainConfig(**small, qa_from=str(tmp_path / "stage2")), report=lambda line: None)
    whole, stage2 = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "stage2" / "model.safetensors")
    stage3 = load_file(tmp_path / "stage3" / "model.safetensors")
    assert whole.keys() == stage3.keys()
    assert all(torch.equal(whole[name], stage3[name]) for name in whole)
    assert not all(torch.equal(whole[name], stage2[name]) for name in whole)  # stage 3 trained something
    notes = json.loads((tmp_path / "stage3" / "config.json").read_text())["notes"]
    assert (notes["qa_steps_done"], notes["robust_steps_done"]) == (3, 3)


def test_object_reps_and_identity_targets_point_each_object_token_at_its_earlier_tokens():
    """Stage 3's identity head: at a kept token that stands for an object in its frame (its
    centre token, else its first kept token there), the sink where no earlier kept token
    stands for that object, else exactly those earlier tokens."""
    from eval.train_tiny import FACT_COUNT, encode_pool, identity_targets, kept_cells, object_reps, pool_tokens, token_owners

    model = new_model(0)
    pool = encode_pool(model, "train", 0, 12)
    spec = parse_spec("random:ratio=0.25")
    first_seen = seen_again = moved = 0
    for index in range(len(pool)):
        facts, tokens = pool.facts[index], pool_tokens(model, pool, index)
        # all tokens kept: an object's token in each frame it is present is its centre token
        reps = object_reps(facts, tokens, token_owners(tokens, pool.owners[index]))
        centres = facts[:, FACT_COUNT + 16:FACT_COUNT + 32].long()
        assert torch.equal(reps >= 0, centres >= 0)
        assert torch.equal(kept_cells(tokens)[reps[reps >= 0]], (torch.arange(16) * 16 + centres)[centres >= 0])
        kept = spec.compressor.compress(tokens, CompressionContext(budget=spec.budget, seed=index, model=model))
        present = token_owners(kept, pool.owners[index])
        reps, targets = object_reps(facts, kept, present), identity_targets(facts, kept, present)
        assert targets.shape == (len(kept), 1 + len(kept))
        frame_of = kept.frame_index
        for object_id in range(reps.shape[0]):
            stands = reps[object_id][reps[object_id] >= 0]
            assert (frame_of[stands].diff() > 0).all()  # one token a frame, in frame order
            for token in stands.tolist():  # each covers the object or holds its centre
                at_centre = kept_cells(kept)[token] == frame_of[token] * 16 + centres[object_id, frame_of[token]]
                assert (int(present[token]) >> object_id) & 1 or at_centre
                moved += not at_centre
        taught = torch.nonzero(targets.any(-1))[:, 0]
        assert set(taught.tolist()) == set(reps[reps >= 0].tolist())
        for token in taught.tolist():
            objects = torch.nonzero((reps == token).any(-1))[:, 0]
            earlier = {int(t) for o in objects for t in reps[o] if 0 <= t < token}
            new = any(not (0 <= reps[o]).logical_and(reps[o] < token).any() for o in objects)
            if new:
                assert targets[token].tolist() == [True] + [False] * len(kept)
                first_seen += 1
            else:
                assert set((torch.nonzero(targets[token])[:, 0] - 1).tolist()) == earlier and not targets[token, 0]
                seen_again += 1
    assert first_seen > 10 and seen_again > 10 and moved > 5


def test_identity_head_adds_its_term_and_trains_only_its_own_head():
    from eval.train_tiny import IDENTITY_HEAD, IDENTITY_LAYER, binding_loss, head_scores, packed_logits

    model = new_model(0)
    tokens, texts, answers = sample_prompt(model, 2)
    targets = torch.zeros(len(tokens), 1 + len(tokens), dtype=torch.bool)
    targets[2, 0] = True  # token 2 seen first: the sink
    targets[20, [1 + 2, 1 + 5]] = True  # token 20 seen before, as tokens 2 and 5
    clip = pack_clip(model, tokens, tokens.span_length, texts, answers)
    clip.identity_targets = targets
    term, added, parts, capture = weighted_head_term(model, clip, "identity", 0.5)
    with torch.no_grad():
        # by hand: the head's softmax over the sink and the visual tokens up to the query itself
        hidden, (cos, sin) = capture[IDENTITY_LAYER]
        start, _ = clip.visual_span
        expected = []
        for token, on in ((2, [0]), (20, [3, 6])):
            scores = head_scores(model.lm.model.layers[IDENTITY_LAYER].self_attn, IDENTITY_HEAD, hidden[0], cos[0],
                                 sin[0], torch.tensor([start + token]), slice(start - 1, start + token + 1))[0]
            expected.append(-torch.log(scores.softmax(-1)[on].sum()))
    torch.testing.assert_close(term, torch.stack(expected).mean())
    torch.testing.assert_close(added, 0.5 * term)
    assert set(parts) == {"answer", "identity"}
    # its gradient reaches that head's query rows (and its KV head), no other query head's
    capture = {}
    packed_logits(model, [clip], capture)
    binding_loss(model, [clip], capture, identity=True)["identity"].backward()
    attention = model.lm.model.layers[IDENTITY_LAYER].self_attn
    rows = attention.q_proj.weight.grad.abs().sum(-1).view(-1, attention.head_dim).sum(-1)
    assert rows[IDENTITY_HEAD] > 0 and (rows[torch.arange(len(rows)) != IDENTITY_HEAD] == 0).all()

