"""Incremental detokenising and stop strings (mnemosyne_hpc/engine/detokenizer.py) with the embedded
SmolLM2's tokenizer (byte-level BPE, as Qwen2 and Llama 3) and a Llama 2-style one (SentencePiece
pieces with byte fallback, as Mistral): the streamed deltas join to exactly what decoding every token at
once gives, for characters split over tokens, emoji, CJK, invalid bytes and special tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mnemosyne_hpc.engine.detokenizer import TextOutput

TEXTS = [
    "The capital of France is Paris.",
    "Héllo wörld, naïve café – “quoted” ‘text’…",
    "中文字符和日本語のテキスト、한국어도",
    "emoji 🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 keycap 1️⃣ end",
    "combining e\u0301 a\u0308 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛",
]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from mnemosyne_hpc.config import compose, resolve_cache_dir
    from mnemosyne_hpc.model.gguf import convert_gguf

    cfg = compose([])
    return AutoTokenizer.from_pretrained(convert_gguf(Path(cfg.model.path), resolve_cache_dir(cfg)))


@pytest.fixture(scope="module")
def sentencepiece_style():
    """Pieces with "▁" for a space, a few merges, every other character as byte tokens <0xNN>; the
    decoder drops the leading space of a text, as Llama 2's does."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = [
        "<unk>",
        "<s>",
        "</s>",
        *(f"<0x{b:02X}>" for b in range(256)),
        "▁",
        *"abcdefghijklmnopqrstuvwxyz.,",
        "▁t",
        "he",
        "▁the",
        "▁a",
        "in",
    ]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n")]
    model = Tokenizer(
        models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>", byte_fallback=True)
    )
    model.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    model.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character split over tokens."""
    if "<0x00>" in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in text.encode()])
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    char = bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids([char[b] for b in text.encode()])


def token_sequences(tokenizer, invalid_utf8: bool) -> list[list[int]]:
    """Each text as the tokenizer encodes it, byte by byte, and with special tokens inside; random
    texts the same ways; with `invalid_utf8`, bytes that are not UTF-8 too (an output ending within a
    character, lone continuation bytes, random tokens)."""
    special = sorted(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    rng = random.Random(0)
    texts = TEXTS + ["".join(rng.choice("ab .,é中🎉́") for _ in range(60)) for _ in range(20)]
    sequences = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        sequences += [ids, byte_tokens(tokenizer, text), ids[:3] + [special[0]] + ids[3:] + [special[-1]]]
        if invalid_utf8:
            sequences.append(byte_tokens(tokenizer, text)[:-1])
    if invalid_utf8:
        lone = byte_tokens(tokenizer, "é")[1:] * 3
        sequences.append(lone + byte_tokens(tokenizer, "中")[:2] + tokenizer.encode("x", add_special_tokens=False))
        sequences += [[rng.randrange(len(tokenizer)) for _ in range(200)] for _ in range(20)]
    return sequences


def stream(tokenizer, token_ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], int]:
    """The deltas as a server would stream them, and the number of tokens taken (up to a stop string)."""
    output, deltas = TextOutput(tokenizer, stop), []
    for n, token in enumerate(token_ids, 1):
        stopped = output.add(token, last=n == len(token_ids))
        deltas.append(output.take())
        if stopped:
            break
        assert not any(s.startswith(tail) for s in stop for tail in _tails("".join(deltas))) or n == len(token_ids), (
            "the start of a stop string was streamed"
        )
    assert "".join(deltas) == output.text
    return deltas, n


def _tails(text: str) -> list[str]:
    return [text[-k:] for k in range(1, min(len(text), 8) + 1)]


@pytest.mark.parametrize("name, invalid_utf8", [("smollm2", True), ("sentencepiece_style", False)])
def test_deltas_join_to_the_whole_decode(name, invalid_utf8, request):
    """Byte fallback decodes a run of byte tokens that is not UTF-8 to one "\ufffd" per byte, valid
    characters in it too; incrementally those come through: that case is left out for it."""
    tokenizer = request.getfixturevalue(name)
    for token_ids in token_sequences(tokenizer, invalid_utf8):
        deltas, _ = stream(tokenizer, token_ids)
        whole = tokenizer.decode(token_ids, skip_special_tokens=True)
        assert "".join(deltas) == whole, (token_ids, deltas)


@pytest.mark.parametrize("name", ["smollm2", "sentencepiece_style"])
def test_stop_strings_end_the_text_at_the_token_that_completes_them(name, request):
    """As when every token was decoded again: the request stops at the first token whose text holds a
    stop string, and the text ends before it; no part of a stop string is streamed before."""
    tokenizer = request.getfixturevalue(name)
    cases = [
        (TEXTS[0], ("of F",)),
        (TEXTS[0], ("Paris", "capital")),
        (TEXTS[1], ("ö", "naïve")),
        (TEXTS[2], ("字符和",)),
        (TEXTS[3], ("👍🏽",)),
        (TEXTS[3], ("flag 🇫", "🇷")),
        (TEXTS[0], ("xyz", "Pax")),
    ]
    for text, stop in cases:
        for token_ids in (tokenizer.encode(text, add_special_tokens=False), byte_tokens(tokenizer, text)):
            deltas, taken = stream(tokenizer, token_ids, stop)
            decoded = [tokenizer.decode(token_ids[:n], skip_special_tokens=True) for n in range(len(token_ids) + 1)]
            expected = next(
                (n for n in range(1, len(token_ids) + 1) if any(s in decoded[n] for s in stop)), len(token_ids)
            )
            cut = min((i for i in (decoded[expected].find(s) for s in stop) if i >= 0), default=None)
            assert taken == expected and "".join(deltas) == decoded[expected][:cut], (text, stop, deltas)


def test_the_window_stays_short_however_long_the_output(smollm2):
    """Each token decodes a window of a few tokens: the cost per token does not grow with the output."""
    token_ids = smollm2.encode(" ".join(TEXTS) * 200, add_special_tokens=False)
    output, longest = TextOutput(smollm2, ("never appears",)), 0
    for token in token_ids:
        output.add(token)
        longest = max(longest, len(output.detokenizer.window))
    output.close()
    assert len(token_ids) > 10_000 and longest <= 8
    assert output.text == smollm2.decode(token_ids)
