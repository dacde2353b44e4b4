"""The word-level tokenizer of vidsieve-tiny, built with `tokenizers` and saved like any HF tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>", "<user>", "<assistant>", "<video>")


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Lower-cased, split on whitespace with punctuation apart ("top-left" stays one word);
    unknown words map to <unk>."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted({w.lower() for w in words} - set(vocab)):
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"<[a-z]+>|[\w-]+|[^\w\s]"), behavior="isolated"),
    ])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
        additional_special_tokens=["<user>", "<assistant>", "<video>"],
    )
