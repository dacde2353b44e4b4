"""The training recipe's pieces: packed question segments and per-patch perception targets."""

import numpy as np
import torch

from compressors import CompressionContext, parse_spec
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
    assert set(targets) == {"colour", "shape", "size", "dot"}
    t, row, col = map(int, np.argwhere(targets["dot"] > 0)[0])
    colour = sw.COLOURS[targets["dot"][t, row, col] - 1]
    patch = frames[t, 16 * row:16 * row + 16, 16 * col:16 * col + 16].reshape(-1, 3)
    assert ((patch == sw.COLOURS_RGB[colour]).all(-1)).sum() >= 4
    assert (targets["colour"] > 0).mean() > 0.05 and (targets["colour"] == 0).mean() > 0.3
