"""Output text, one token at a time: incremental detokenising and stop strings.

Decoding all of a request's output again after every token costs O(n) per token, O(n²) per request.
Here a token costs a decode of a short window, as in vLLM's incremental detokeniser: the window starts
at the prefix offset, the last point where the text was complete; tokens from the read offset on are
new; the new text is the window's text minus the text of its tokens before the read offset (decoded
in the same context, so a tokenizer that drops a leading space at the start of a text drops it in
both). While the window's text ends in an incomplete UTF-8 sequence ("\\ufffd") nothing is released.
Stop strings are searched in the new text and the few characters held back before it; the held-back
tail is the longest one that could be the start of a stop string, so a stop string split across tokens
is never streamed. The deltas join to exactly `tokenizer.decode(tokens, skip_special_tokens=True)`,
cut before the first stop string; an output that ends within a character ends with "\\ufffd", as that
decode gives it. Two cases differ, as in vLLM: byte fallback (Llama 2, Mistral) decodes a run of byte
tokens that is not UTF-8 to one "\\ufffd" per byte, where the valid characters before the bad bytes
come through here; and a stop string completed by a token that also starts an unfinished character is
seen one token later (the text still ends before it).

Where it runs: on rank 0's engine thread, as each token is appended (`Engine.step`). A stop string
must end its request at the token that completes it (finish reason "stop", KV blocks freed, no token
generated after it), as a stop token does; a front end detokenising on its own thread would see the
stop string a step or more late and have to abort a request that had run on. The cost per token does
not grow with the output (a decode of a few tokens, `bench/detokenize.py`), so the ranks do not wait
on it; the front ends receive text deltas only (`TextOutput.take`).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.skipped = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        self.window: list[int] = []  # tokens from the prefix offset on
        self.read = 0  # window[:read]: decoded before, the context of the new tokens
        self.prefix_text = ""  # the text of window[:read]

    def add(self, token_id: int) -> str:
        """The text this token completes ("" while the text ends in an incomplete character)."""
        if token_id in self.skipped:  # decoding drops it anyway; kept out, it cannot grow the window
            return ""
        self.window.append(token_id)
        text = self._decode(self.window)
        if len(text) <= len(self.prefix_text) or text.endswith("\ufffd"):
            return ""
        new = text[len(self.prefix_text) :]
        self.window = self.window[self.read :]
        self.read = len(self.window)
        self.prefix_text = self._decode(self.window)
        return new

    def flush(self) -> str:
        """The text not yet returned, an incomplete character at its end as "\\ufffd" (the output ended)."""
        return self._decode(self.window)[len(self.prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class TextOutput:
    """A request's output text: released as tokens arrive, held back while it could begin a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = stop
        self.released: list[str] = []
        self.taken = 0  # pieces of `released` already taken
        self.held = ""  # decoded, not released: the start of a stop string, perhaps
        self.closed = False

    def add(self, token_id: int, last: bool = False) -> bool:
        """Append a token (`last`: the output ends with it). True when a stop string appeared: the text
        ends before it, and the output is closed."""
        return self._release(self.detokenizer.add(token_id), last)

    def close(self) -> None:
        """The output ended (aborted, failed): release everything held."""
        self._release("", last=True)

    def take(self) -> str:
        """Text released since the last call."""
        new = "".join(self.released[self.taken :])
        self.taken = len(self.released)
        return new

    @property
    def text(self) -> str:
        return "".join(self.released)

    def _release(self, new: str, last: bool) -> bool:
        if self.closed:
            return False
        if last:
            new += self.detokenizer.flush()
        text = self.held + new  # no stop string starts before: the held tail is the only candidate
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        stopped = bool(hits)
        if stopped:
            text = text[: min(hits)]
        keep = 0 if stopped or last else _stop_start(text, self.stop)
        if len(text) > keep:
            self.released.append(text[: len(text) - keep])
        self.held = text[len(text) - keep :]
        self.closed = stopped or last
        return stopped


def _stop_start(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is the start of a stop string."""
    for k in range(min(len(text), max(map(len, stop), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stop):
            return k
    return 0
