"""Text in: prompts and conversations become token ids on the front end's own threads (the HTTP
server's worker threads, the REPL's conversation thread, the batch reader), never on the thread that
drives the ranks: a 1M-token prompt takes the tokenizer about two seconds, which every streaming
request would otherwise wait for. The engine takes token ids only."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from mnemosyne_hpc.engine.request import RequestError


def tokenizing_threads(nice: int, workers: int = 2) -> ThreadPoolExecutor:
    """Threads for tokenising, at niceness `nice` (Linux schedules threads alone): where the ranks fill
    every core, a long prompt's tokenising takes the time they leave instead of slowing their steps."""

    def lower_priority() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)

    return ThreadPoolExecutor(workers, thread_name_prefix="tokenize", initializer=lower_priority)


class InputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def prompt_tokens(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None) -> list[int]:
        """Exactly one of a text prompt and token ids → token ids (ids are checked by the engine)."""
        if (prompt is None) == (prompt_token_ids is None):
            raise RequestError("give exactly one of prompt and prompt_token_ids")
        if prompt_token_ids is not None:
            return prompt_token_ids
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string")
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer; send prompt_token_ids")
        _check_unicode(prompt, "the prompt")
        try:
            return self.tokenizer.encode(prompt)
        except Exception as e:  # noqa: BLE001 - any text the tokenizer refuses is this request's error
            raise RequestError(f"the prompt could not be tokenised: {type(e).__name__}: {e}") from None

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """A conversation through the model's chat template, ending with the assistant's turn to answer."""
        if self.tokenizer is None or self.tokenizer.chat_template is None:
            raise RequestError("this model has no chat template; use /v1/completions")
        for message in messages:
            _check_unicode(message["content"], f"a {message['role']!r} message")
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as e:  # noqa: BLE001 - the template or tokenizer refused this conversation
            raise RequestError(f"messages could not be formatted or tokenised: {type(e).__name__}: {e}") from None
        return list(ids)

    def text(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer")
        vocabulary = len(self.tokenizer)
        if any(t >= vocabulary for t in token_ids):
            raise RequestError(f"token ids must be below the vocabulary size {vocabulary}")
        return self.tokenizer.decode(token_ids)


def _check_unicode(text: str, what: str) -> None:
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"), which is not text: no tokenizer takes it."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise RequestError(f"{what} holds a lone UTF-16 surrogate (such as \\ud800), which is not text") from None
