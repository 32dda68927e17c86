"""The OpenAI-compatible request and response models (pydantic), with our own knobs as documented extra fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jetson_dllm.errors import DllmError
from jetson_dllm.sampler import GUIDANCE_SCHEDULES, KNOB, STRATEGIES


def knob_field(name: str, default, **override):
    """A request field for one of the sampler's knobs (jetson_dllm.sampler.KNOBS): its range and description from the
    table, `override` where the server is stricter (fewer steps than `dllm run` allows)."""
    knob = KNOB[name]
    bounds = {} if knob.choices or knob.low is None else {"gt" if knob.low_open else "ge": knob.low}
    if knob.high is not None and not knob.choices:
        bounds["le"] = knob.high
    if isinstance(default, float):
        bounds["allow_inf_nan"] = False
    return Field(default, **(bounds | override), description=knob.help)


class Knobs(BaseModel):
    """What a diffusion model adds to the OpenAI fields (all optional; `dllm run`'s defaults). Types are strict: `true`
    is not a count and "yes" is not a boolean (refused, never coerced); an integer is a number."""

    model_config = ConfigDict(strict=True)

    steps: int = knob_field("steps", 64, le=4096)
    strategy: Literal[STRATEGIES] = knob_field("strategy", "confidence")  # type: ignore[valid-type]
    threshold: float = knob_field("threshold", 0.9)
    span: int = knob_field("span", 0, le=16384)
    eb_bound: float = knob_field("eb_bound", 0.1)
    deadline_ms: float = knob_field("deadline_ms", 0.0, le=3_600_000)
    eta: float = knob_field("eta", 0.0)
    clamp: bool = knob_field("clamp", False)
    guidance: float = knob_field("guidance", 0.0)
    guidance_schedule: Literal[GUIDANCE_SCHEDULES] = knob_field("guidance_schedule", "constant")  # type: ignore[valid-type]
    canvas: bool = Field(False, description="stream the canvas itself (masked positions, commits) in a `dllm` field of each chunk")


class _Sampling(Knobs):
    """The OpenAI fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    temperature: float = knob_field("temperature", 0.8)
    top_p: float = knob_field("top_p", 1.0)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    user: str | None = None
    # Accepted only at their neutral values, so a client that always sends them works and none is silently ignored.
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: 0 only")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: 0 only")

    @field_validator("stop")
    @classmethod
    def _valid_text(cls, stop):
        """A stop sequence is text the generation could contain: valid Unicode (a lone surrogate is refused, as in a
        prompt)."""
        for s in [stop] if isinstance(stop, str) else stop or []:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"holds a character that is not valid Unicode ({s[e.start]!r} at offset {e.start}); send UTF-8 text") from None
        return stop


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(..., description="text to continue; a list generates for each")
    suffix: str | None = Field(None, description="text after the completion: the model fills the gap between prompt and suffix")
    max_tokens: int = Field(64, ge=1, le=16384)
    echo: Literal[False] = Field(False, description="not supported: false only")
    logprobs: None = Field(None, description="not supported: null only")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # a field we would not read (name, tool_calls...) is refused

    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=16384)
    max_completion_tokens: int | None = Field(None, ge=1, le=16384)


def chat_prompt(messages: list[ChatMessage], tokenizer=None) -> str:
    """The prompt of a chat. A model with a chat template of its own (an imported instruct model: the GGUF's
    `tokenizer.chat_template`, a Hugging Face folder's) gets the conversation rendered by it, with the assistant's
    turn opened, in a sandboxed Jinja environment as transformers renders it. Otherwise (our story models, which
    continue stories and do not take turns) the conversation's text, one message per line, is the story so far and
    the reply its continuation."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "\n".join(m.content.strip() for m in messages if m.content.strip())
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):  # what templates written for transformers call on a conversation they refuse
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    piece = lambda i: tokenizer.tok.id_to_token(int(i)) or ""  # noqa: E731
    try:
        return env.from_string(template).render(messages=[{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True,
                                                bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eot_id))
    except TemplateError as e:
        raise DllmError(f"the model's chat template failed: {str(e)[:160]}") from None
    except Exception as e:  # what rendering can raise beyond Jinja's own errors: the sandbox's range limit, a type error
        raise DllmError(f"the model's chat template could not render this conversation ({type(e).__name__}: {str(e)[:120]})") from None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
