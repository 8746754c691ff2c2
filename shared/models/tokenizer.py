"""Small deterministic tokenizers built locally with the `tokenizers` library.

`build_word_tokenizer` turns a fixed word list into a WordPiece tokenizer: every
listed word is one token, and any other word is spelled out from single-character
pieces (``c``, ``##c``), so every printable ASCII text encodes without `<unk>`.
The vocabulary order (and hence every id) depends only on the arguments, so the
same call always produces the same ``tokenizer.json``.

Layout of the vocabulary: special tokens first (ids 0..), then characters, then
``##``-continuation characters, then the words (deduplicated, in the given order).
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = "<image>"

# Order fixes the ids: <pad>=0, <unk>=1, <s>=2, </s>=3, <image>=4.
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)

# Letters, digits and punctuation: enough pieces to spell any printable ASCII word.
DEFAULT_CHARACTERS: str = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation

CONTINUATION_PREFIX = "##"


def build_vocab(
    words: Iterable[str],
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    characters: str = DEFAULT_CHARACTERS,
    lowercase: bool = True,
) -> dict[str, int]:
    """The token → id map used by `build_word_tokenizer` (deterministic, first occurrence wins)."""
    ordered: list[str] = []
    seen: set[str] = set()

    def add(token: str) -> None:
        if token and token not in seen:
            seen.add(token)
            ordered.append(token)

    for token in special_tokens:
        add(token)
    chars = [c for c in characters if not c.isspace()]
    if lowercase:
        chars = [c for c in chars if c == c.lower()]
    for c in chars:
        add(c)
    for c in chars:
        add(CONTINUATION_PREFIX + c)
    for word in words:
        word = word.strip()
        if lowercase:
            word = word.lower()
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"word list entries must be non-empty and contain no whitespace: {word!r}")
        add(word)
    return {token: i for i, token in enumerate(ordered)}


def build_word_tokenizer(
    words: Sequence[str],
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    characters: str = DEFAULT_CHARACTERS,
    lowercase: bool = True,
    bos_token: str | None = BOS_TOKEN,
    eos_token: str | None = EOS_TOKEN,
    pad_token: str | None = PAD_TOKEN,
    unk_token: str = UNK_TOKEN,
    add_bos: bool = True,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` over ``words`` + single characters, built without any download.

    - normalizer: NFKC (+ lowercase when ``lowercase``);
    - pre-tokenizer: split on whitespace and punctuation (BERT style);
    - model: WordPiece over the fixed vocabulary (unknown words fall back to characters);
    - post-processor: prepends ``bos_token`` when ``add_bos``;
    - decoder: WordPiece (joins ``##`` pieces, spaces between words).

    ``special_tokens`` must include ``unk_token`` and every non-None of bos/eos/pad; all of
    them are registered as special (never split, skipped by ``skip_special_tokens``).
    """
    named = {"unk_token": unk_token, "bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
    for name, value in named.items():
        if value is not None and value not in special_tokens:
            raise ValueError(f"{name} {value!r} must be listed in special_tokens")
    vocab = build_vocab(words, special_tokens=special_tokens, characters=characters, lowercase=lowercase)

    tok = Tokenizer(
        WordPiece(
            vocab,
            unk_token=unk_token,
            continuing_subword_prefix=CONTINUATION_PREFIX,
            max_input_chars_per_word=100,
        )
    )
    norm: list[normalizers.Normalizer] = [normalizers.NFKC()]
    if lowercase:
        norm.append(normalizers.Lowercase())
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX, cleanup=True)
    if add_bos and bos_token is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A $B:1",
            special_tokens=[(bos_token, vocab[bos_token])],
        )
    tok.add_special_tokens(list(special_tokens))

    extra = [t for t in special_tokens if t not in named.values()]
    kwargs: dict[str, object] = {}
    if extra == [IMAGE_TOKEN]:
        # Named, so that `tokenizer.image_token` exists (as on hub LLaVA tokenizers).
        kwargs["extra_special_tokens"] = {"image_token": IMAGE_TOKEN}
    elif extra:
        kwargs["extra_special_tokens"] = extra
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
