"""The request bodies of ``loramoe serve``'s OpenAI API, as pydantic models.

Validation is strict (a number sent as a string, or ``1`` for ``true``, is refused rather than
coerced), so a client's type mistake gets a 422 naming the field instead of a silently different
request. Fields OpenAI defines that the server has no use for (``user``, ``presence_penalty``...)
are ignored, as OpenAI's own clients and chat front ends send them. What depends on the model
(``max_tokens`` against its context, routing against its kind) is checked by the app, which knows
the model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator

DEFAULT_TEMPERATURE = 1.0
"""OpenAI's default: a request without ``temperature`` samples; 0 decodes greedily."""


def _one_or_list(value: object) -> object:
    """``stop`` may be one string or a list of them; the list is what the engine takes."""
    return [value] if isinstance(value, str) else value


StopStrings = Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(max_length=4),
                        BeforeValidator(_one_or_list)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Message(_Strict):
    """One turn of a conversation."""

    role: Literal["system", "user", "assistant"]
    content: str


class LoramoeOptions(_Strict):
    """The ``loramoe`` extension field."""

    routing: bool = False
    """Return each generated token's gate share per expert group (LoRAMoE models only)."""


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send a last chunk with the token counts (and no choices) before ``[DONE]``."""


class _Sampling(_Strict):
    """The fields chat and text completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    """The longest completion; None: as much as fits the context, up to 256."""
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: StopStrings | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    """OpenAI's number of choices: one per request here (send several requests, they are batched)."""
    loramoe: LoramoeOptions | None = None

    @property
    def routing(self) -> bool:
        return self.loramoe is not None and self.loramoe.routing

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def sampling_temperature(self) -> float:
        return DEFAULT_TEMPERATURE if self.temperature is None else self.temperature


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for ``max_tokens``; it wins when both are given, as in OpenAI's API."""

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "user":
            raise ValueError(f"the last message must be the user's turn to answer, not '{messages[-1].role}'")
        return messages

    @property
    def completion_limit(self) -> int | None:
        """The asked-for limit on the completion's length, under either name (None: not given)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def limit_param(self) -> str:
        """The field the limit came from, for an error that names it."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a raw text prompt, tokenized with the tokenizer's own special tokens."""

    prompt: str

    @property
    def completion_limit(self) -> int | None:
        return self.max_tokens

    @property
    def limit_param(self) -> str:
        return "max_tokens"
