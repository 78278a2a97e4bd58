"""Log-probabilities in the OpenAI API's two shapes: completions' parallel lists (tokens, token_logprobs,
top_logprobs, text_offset) and chat's list of per-token objects. A token is shown as its own text."""

from __future__ import annotations

from typing import Optional

from mnemosyne_hpc.engine.request import TokenLogprob


class LogprobFormat:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        """The token decoded alone ("\\ufffd" where it holds part of a character)."""
        if token_id not in self._texts:
            self._texts[token_id] = self.tokenizer.decode([token_id])
        return self._texts[token_id]

    def completion(self, entries: list[tuple[int, Optional[TokenLogprob]]], offset: int = 0) -> tuple[dict, int]:
        """(token id, its log-probability or None for a prompt's first token) → the completions shape,
        text offsets counted from `offset`; and the offset after the last token."""
        tokens, values, tops, offsets = [], [], [], []
        for token_id, entry in entries:
            text = self.text(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            values.append(entry.logprob if entry else None)
            tops.append(self._top(entry) if entry else None)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        """The alternatives by text, and the token itself (as other servers give it, so a greedy token's
        log-probability is the largest value)."""
        top = {}
        for token_id, logprob in entry.top:
            top.setdefault(self.text(token_id), logprob)
        top.setdefault(self.text(entry.token_id), entry.logprob)
        return top

    def chat(self, entries: list[TokenLogprob]) -> dict:
        return {
            "content": [
                {**self._item(e.token_id, e.logprob), "top_logprobs": [self._item(i, lp) for i, lp in e.top]}
                for e in entries
            ]
        }

    def _item(self, token_id: int, logprob: float) -> dict:
        text = self.text(token_id)
        return {"token": text, "logprob": logprob, "bytes": None if "\ufffd" in text else list(text.encode())}
