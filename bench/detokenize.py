"""Output processing cost per token against output length: the incremental detokeniser with its stop
string check (mnemosyne_hpc/engine/detokenizer.py) beside decoding the whole output after every token
(what the engine did before: once for the stop strings, once more for the streamed text), on the
embedded SmolLM2's tokenizer and real text (this repository's README, English, code and symbols, with
a paragraph of CJK and emoji), one stop string that never appears.

    .venv/bin/python bench/detokenize.py

Writes bench/results/detokenize.json: mean microseconds per token at each output length, for both,
and their ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import ROOT, write_results

STOP = ("\n\n\n\n",)
EXTRA = "\n中文字符和日本語のテキスト、한국어도。emoji 🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 naïve café – “quoted”.\n"


def incremental(tokenizer, token_ids: list[int]) -> str:
    from mnemosyne_hpc.engine.detokenizer import TextOutput

    output, streamed = TextOutput(tokenizer, STOP), []
    for n, token in enumerate(token_ids, 1):
        output.add(token, last=n == len(token_ids))
        streamed.append(output.take())
    return "".join(streamed)


def whole_decode(tokenizer, token_ids: list[int]) -> str:
    """The engine before: after each token, the whole output decoded for the stop strings and again
    for the text to stream; the new characters are what is longer than the text sent."""
    sent = ""
    for n in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:n], skip_special_tokens=True)
        if any(s in text for s in STOP):
            break
        text = tokenizer.decode(token_ids[:n], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            text = text[:-1]
        sent += text[len(sent) :]
    return sent


def per_token_us(function, tokenizer, token_ids: list[int], repeats: int) -> tuple[float, str]:
    best, text = float("inf"), ""
    for _ in range(repeats):
        start = time.perf_counter()
        text = function(tokenizer, token_ids)
        best = min(best, time.perf_counter() - start)
    return 1e6 * best / len(token_ids), text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000])
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from mnemosyne_hpc.config import compose, resolve_cache_dir
    from mnemosyne_hpc.model.gguf import convert_gguf

    cfg = compose([])
    tokenizer = AutoTokenizer.from_pretrained(convert_gguf(Path(cfg.model.path), resolve_cache_dir(cfg)))
    text = (ROOT / "README.md").read_text() + EXTRA
    token_ids = tokenizer.encode(text * (max(args.lengths) // len(tokenizer.encode(text)) + 1))
    results = {}
    for length in args.lengths:
        ids = token_ids[:length]
        repeats = 5 if length <= 1000 else 1
        new_us, new_text = per_token_us(incremental, tokenizer, ids, repeats)
        old_us, _ = per_token_us(whole_decode, tokenizer, ids, repeats)
        assert new_text == tokenizer.decode(ids, skip_special_tokens=True)
        results[str(length)] = {
            "incremental_us_per_token": new_us,
            "whole_decode_us_per_token": old_us,
            "speedup": old_us / new_us,
        }
        print(
            f"{length:6d} tokens: incremental {new_us:8.1f} µs/token, whole decode {old_us:9.1f} µs/token "
            f"({old_us / new_us:.0f}×)",
            flush=True,
        )
    write_results(
        "detokenize.json",
        {
            "benchmark": "detokenize",
            "tokenizer": Path(cfg.model.path).stem,
            "stop": list(STOP),
            "text": "README.md repeated, with CJK and emoji",
            "by_output_tokens": results,
        },
    )


if __name__ == "__main__":
    main()
