"""The OpenAI API's bodies as this server takes and gives them.

The served OpenAPI schema is built from these models and every request is checked against them, so
the schema is what the server does: strict types (no "1" for 1, no true for 1), no unknown fields, and
the fields a client may send but this server does not honour yet (`UNSUPPORTED`) accepted only at
their neutral value: asking for more is a 400 naming the field, never silently ignored.
The engine checks the sampling values again, for every front end.
"""

from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mnemosyne_hpc.engine.request import MAX_LOGPROBS

SEED_LIMIT = 2**63

# field → what to do instead; each is declared with `neutral(value)`, the one value accepted
UNSUPPORTED = {
    "n": "send n requests: prefix caching shares their prompt",
    "best_of": "send several requests and pick",
    "presence_penalty": "not supported by this server yet",
    "frequency_penalty": "not supported by this server yet",
    "logit_bias": "not supported by this server yet",
    "suffix": "not supported by this server yet",
}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def neutral(value):
    """A field accepted at its neutral value only (see UNSUPPORTED), or left out."""
    schema = {"enum": [value, None]} if value is not None else {"type": "null"}
    return Field(value, description=f"not supported: only {json.dumps(value)}", json_schema_extra=schema)


class StreamOptions(Body):
    include_usage: bool = Field(False, description="a last chunk with the usage and no choices")
    continuous_usage_stats: bool = Field(False, description="the usage so far in every chunk (as vLLM's server)")


class Sampling(Body):
    """Fields common to completions and chat completions."""

    model: Optional[str] = Field(None, description="the served model's id (GET /v1/models); may be left out")
    max_tokens: Optional[int] = Field(None, ge=1, description="at most cache.max_model_len minus the prompt")
    temperature: Optional[float] = Field(None, ge=0, description="0: greedy")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0, description="0: off")
    seed: Optional[int] = Field(None, ge=0, lt=SEED_LIMIT)
    stop: Optional[str | list[Annotated[str, Field(min_length=1)]]] = None
    stop_token_ids: Optional[list[Annotated[int, Field(ge=0)]]] = None
    ignore_eos: Optional[bool] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    n: Optional[int] = neutral(1)
    presence_penalty: Optional[float] = neutral(0)
    frequency_penalty: Optional[float] = neutral(0)
    logit_bias: Optional[dict[str, float]] = neutral(None)

    REFUSED: ClassVar[tuple] = ()  # (refused(request), why): combinations of fields refused with a 400

    @model_validator(mode="after")
    def _combinations(self):
        for refused, why in self.REFUSED:
            if refused(self):
                raise ValueError(why)
        return self

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        for name, instead in UNSUPPORTED.items():
            if not isinstance(data, dict) or name not in cls.model_fields or data.get(name) in (None, {}):
                continue
            given, value = data[name], cls.model_fields[name].default
            if isinstance(given, bool) != isinstance(value, bool):
                continue  # a wrong type: the field's own check says so
            if given != value:
                raise ValueError(f"{name} = {json.dumps(given)} is not supported ({instead}); leave it out")
        return data

    def sampling(self) -> dict:
        """The fields the engine samples with (SamplingParams)."""
        fields = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(Sampling):
    prompt: (
        str
        | TokenIds
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    ) = Field(description="text, or token ids; a batch of one of either")
    max_tokens: Optional[int] = Field(
        None, ge=0, description="at most cache.max_model_len minus the prompt; 0 (with echo): score the prompt only"
    )
    best_of: Optional[int] = neutral(1)
    logprobs: Optional[int] = Field(
        None, ge=0, le=MAX_LOGPROBS, description="log-probabilities of each token, with this many alternatives"
    )
    echo: Optional[bool] = Field(None, description="the prompt before the completion, with its log-probabilities")
    suffix: Optional[str] = neutral(None)

    REFUSED = (
        (lambda r: r.max_tokens == 0 and not r.echo, "max_tokens = 0 scores the prompt only: it needs echo = true"),
    )

    def sampling(self) -> dict:
        fields = super().sampling()
        if self.logprobs is not None:
            fields.update(logprobs=self.logprobs, prompt_logprobs=self.logprobs if self.echo else None)
        if self.max_tokens == 0:
            fields["max_tokens"] = 1  # the prompt is computed as for one token, which is left out
        return fields

    def prompt_text_or_ids(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return prompt[0]  # a batch of one
        return prompt


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "user", "assistant"] = Field(description="the roles the chat template knows")
    content: str | list[TextPart] = Field(description="a string, or a list of {type: text, text} parts")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


def conversation(messages: list[Message]) -> list[dict]:
    """Messages as the chat template takes them: role and text."""
    return [{"role": m.role, "content": m.text()} for m in messages]


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="the same as max_tokens")
    logprobs: Optional[bool] = Field(None, description="log-probabilities of the answer's tokens")
    top_logprobs: Optional[int] = Field(
        None, ge=0, le=MAX_LOGPROBS, description="alternatives per token (needs logprobs = true)"
    )

    REFUSED = ((lambda r: r.top_logprobs is not None and not r.logprobs, "top_logprobs needs logprobs = true"),)

    def sampling(self) -> dict:
        fields = super().sampling()
        if self.max_completion_tokens is not None:
            fields["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            fields["logprobs"] = self.top_logprobs or 0
        return fields


class TokenizeRequest(Body):
    """Either a prompt or a conversation (with the chat template applied)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = Field(None, min_length=1)


class DetokenizeRequest(Body):
    model: Optional[str] = None
    tokens: TokenIds


def problems(error: ValidationError, model: type[BaseModel]) -> str:
    """A validation error as one line naming each field: 'temperature: Input should be a valid number'.
    A value that fits none of a field's forms (a union) is one problem, not one per form."""
    found: dict[str, list[str]] = {}
    for e in error.errors(include_url=False):
        parts = [str(part) for part in e["loc"]]
        branch = next((i for i, part in enumerate(parts) if _is_union_branch(part)), None)
        where = ".".join(parts[:branch])
        message = e["msg"].removeprefix("Value error, ")
        if branch is not None:
            field = model.model_fields.get(where)
            about = field.description if field and field.description else "see /openapi.json"
            message = f"not any of its accepted forms ({about})"
        found.setdefault(f"{where}: {message}" if where else message, [])
    return "; ".join(found)


def _is_union_branch(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "none") or part in _MODELS


# Responses (what the schema promises; the server builds them as plain dicts)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] = Field(description="cached_tokens: prompt tokens found in the prefix cache")


class CompletionLogprobs(BaseModel):
    """Per token (the prompt's first, with echo, has none): its text, log-probability, the most likely
    alternatives by text, and where its text starts."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = Field(description="the token's UTF-8 bytes; null where it is part of a character")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


_MODELS = {"TextPart", "StreamOptions", "Message"}
