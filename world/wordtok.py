"""A word-level tokenizer that `AutoTokenizer.from_pretrained` loads.

Small models (the built-in one and the tiny test pipelines) know a closed
vocabulary; a word-level tokenizer makes unknown words explicit ([UNK]) so the
worker can drop and report them instead of feeding noise to the text encoder.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIALS = (PAD, UNK, BOS, EOS)


def build_word_tokenizer(words: Iterable[str], model_max_length: int) -> PreTrainedTokenizerFast:
    """Lower-cases, treats every non-alphanumeric run as a space, and wraps the
    words in [BOS] … [EOS] like CLIP's tokenizer does."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in words:
        word = word.lower()
        if word not in vocab:
            vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(Regex(r"[^a-z0-9]+"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=model_max_length,
    )
