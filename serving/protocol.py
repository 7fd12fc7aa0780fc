"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions.

Requests are pydantic models that refuse unknown fields and out-of-range values, and every field
has a bound (the MAX_* constants); `parse_request` also refuses bodies nested too deep, and turns a
validation failure into an `ApiError` whose message starts with the offending field, in OpenAI's
error shape. Beyond OpenAI's fields, vLLM's `top_k`, `stop_token_ids` and `ignore_eos`
are accepted. Responses are plain dicts built by the small functions at the bottom.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema

from raylm.inference.detokenize import TextOffsets, TokenTexts
from raylm.inference.sampling import SamplingParams, TokenChoice


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Bounds on what a request may ask for: past one, the request gets a 400 naming the field. The body's
# size is bounded by the app (`max_body_bytes`, 413), the prompt's tokens by the context (the engine).
MAX_STOP = 16  # stop strings: each is matched against the text after every token
MAX_STOP_CHARS = 256  # characters in one stop string
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # tokens in logit_bias, as OpenAI allows
MAX_NAME_CHARS = 256  # model, user, a message's name
MAX_MESSAGES = 1024
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 256  # prompts in one completions request (lm-eval sends its batch as one list)
MAX_CHOICES = 256  # prompts x n: the sequences one request may hold in the engine
MAX_JSON_DEPTH = 32  # nesting of the body's objects and lists (a chat request needs 4)
INT64 = (-(2**63), 2**63 - 1)  # the seed's range: OpenAI's, and what torch's generator takes
# Ids past the vocabulary are refused by the engine; the app's published schema narrows the bound to it.
TOKEN_ID = Annotated[int, Field(ge=0, le=2**31 - 1, json_schema_extra={"x-token-id": True})]
NAME = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
STOP_STRING = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
PROMPT_TEXT = Annotated[str, Field(min_length=1)]  # its length is bounded by the body's size and the context
TOKEN_IDS = Annotated[list[TOKEN_ID], Field(min_length=1)]  # its length is bounded by the context (the engine)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: NAME
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] = 0  # vLLM's extension; -1 or 0 = off
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1  # choices sampled independently from each prompt
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: STOP_STRING | Annotated[list[STOP_STRING], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TOKEN_ID], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    seed: Annotated[int, Field(ge=INT64[0], le=INT64[1])] | None = None
    logit_bias: Annotated[dict[TOKEN_ID, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    user: NAME | None = None


class CompletionRequest(SamplingFields):
    # Every form OpenAI's API takes: a string, token ids, a list of strings, a list of token-id lists.
    prompt: (
        PROMPT_TEXT
        | TOKEN_IDS
        | Annotated[list[PROMPT_TEXT], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TOKEN_IDS], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: Annotated[int, Field(ge=0)] = 16  # 0 only with echo: the prompt scored, nothing generated
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False  # the prompt before the output, in the text and (with logprobs) in the logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or token ids: one per prompt of a list, else the one."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: NAME | None = None

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


Request = Union[CompletionRequest, ChatRequest]


def field_name(loc: tuple) -> str:
    """A pydantic error location -> the request field, e.g. ("messages", 0, "role") -> messages[0].role."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("str", "int") or "[" in part or "-" in part:
            break  # pydantic names the union member it tried (or "[key]"); the field is what the user knows
        else:
            name += f".{part}" if name else str(part)
    return name


def telling_error(errors: list[dict]) -> dict:
    """The error to report: for a union (`stop` is a string or a list), the member whose type the
    value had and whose bound it broke, not the member it was never meant as."""
    return next((e for e in errors if not e["type"].endswith(("_type", "_parsing"))), errors[0])


def nested_deeper_than(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def load_json(body: bytes):
    """The body's JSON, nested at most MAX_JSON_DEPTH deep (deeper bodies would exhaust the parser's stack)."""
    too_deep = ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep; requests need far fewer", code="body_too_deep")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}") from None
    except RecursionError:
        raise too_deep from None
    if isinstance(data, (dict, list)) and nested_deeper_than(data, MAX_JSON_DEPTH):
        raise too_deep
    return data


def parse_request(cls: type[Request], body: bytes) -> Request:
    data = load_json(body)
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = telling_error(err.errors())
        param = field_name(first["loc"]) or None
        if first["type"] == "extra_forbidden":
            message = f"{param}: unknown field (not supported by this server)"
        elif first["type"] == "missing":
            message = f"{param}: field required"
        else:
            message = f"{param}: {first['msg']}"
        raise ApiError(400, message, param) from None


def sampling_params(req: Request, max_tokens: int) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    prompt_logprobs = None
    if isinstance(req, CompletionRequest):
        logprobs = req.logprobs
        if req.echo:
            prompt_logprobs = logprobs
    else:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_k=max(req.top_k, 0),
        top_p=req.top_p,
        seed=req.seed,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        logit_bias=dict(req.logit_bias or {}),
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


# ---- responses ------------------------------------------------------------------------------------
# The models document the bodies in the published OpenAPI schema; the functions below build them.


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


SCHEMA_MODELS = [
    (CompletionRequest, "validation"), (ChatRequest, "validation"), (ErrorResponse, "serialization"),
    (CompletionResponse, "serialization"), (ChatCompletionResponse, "serialization"), (ModelList, "serialization"),
    (Health, "serialization"),
]


def schema_components(model_name: str, vocab_size: int, max_len: int) -> dict:
    """The request and response models as OpenAPI components, with this server's own bounds: the
    model's name, token ids inside its vocabulary, token-id prompts and max_tokens within its context."""
    _, top = models_json_schema(SCHEMA_MODELS, ref_template="#/components/schemas/{model}")
    components = top["$defs"]

    def narrow(node):
        if isinstance(node, dict):
            if node.pop("x-token-id", False):
                node["maximum"] = vocab_size - 1
            for child in node.values():
                narrow(child)
        elif isinstance(node, list):
            for child in node:
                narrow(child)

    narrow(components)
    for name in ("CompletionRequest", "ChatRequest"):
        fields = components[name]["properties"]
        fields["model"]["enum"] = [model_name]
        for key in ("max_tokens", "max_completion_tokens"):
            for bound in [fields[key], *fields[key].get("anyOf", [])] if key in fields else []:
                if bound.get("type") == "integer":
                    bound["maximum"] = max_len - 1  # the prompt holds at least one token
        # logit_bias keys are token ids written as JSON strings.
        next(b for b in fields["logit_bias"]["anyOf"] if b.get("type") == "object")["propertyNames"] = {"pattern": r"^(0|[1-9][0-9]{0,9})$"}
    for member in components["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        items = member.get("items", {})
        if items.get("type") == "integer":
            member["maxItems"] = max_len - 1  # a prompt must leave room for a generated token
        elif items.get("type") == "array":
            items["maxItems"] = max_len - 1
    return components


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class CompletionLogprobs:
    """One choice's `logprobs` in the legacy completions shape, built as its tokens come:
    `tokens` (each token's text), `token_logprobs`, `top_logprobs` ({text: logprob}) and
    `text_offset` (where each token starts in the choice's text, which starts with the prompt's
    when echoed). Each `add_*` returns the part for the tokens it is given (a stream's chunk);
    `total` holds them all."""

    def __init__(self, texts: TokenTexts, output_start: int):
        self.texts = texts
        self.output_offsets = TextOffsets(texts.tokenizer, skip_special_tokens=True, start=output_start)  # as the output's text
        self.total: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add_prompt(self, prompt_ids: list[int], scored: list[TokenChoice]) -> dict:
        """The echoed prompt: its first token has None for both logprobs (nothing before it scores
        it), the others their scores (`scored`, one per token after the first)."""
        offsets = TextOffsets(self.texts.tokenizer, skip_special_tokens=False)  # as the echoed text, special tokens and all
        return self.extend(
            [self.texts.text(t) for t in prompt_ids],
            [None] + [c.logprob for c in scored],
            [None] + [self.top(c) for c in scored],
            [offsets.add(t) for t in prompt_ids],
        )

    def add(self, choices: list[TokenChoice]) -> dict:
        return self.extend(
            [self.texts.text(c.token) for c in choices],
            [c.logprob for c in choices],
            [self.top(c) for c in choices],
            [self.output_offsets.add(c.token) for c in choices],
        )

    def top(self, choice: TokenChoice) -> dict:
        return {self.texts.text(t): lp for t, lp in (choice.top or [])}

    def extend(self, tokens: list, logprobs: list, tops: list, offsets: list) -> dict:
        part = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
        for key, values in part.items():
            self.total[key] += values
        return part


def chat_logprobs(choices: list[TokenChoice], texts: TokenTexts) -> dict:
    def entry(token: int, logprob: float) -> dict:
        return {"token": texts.text(token), "logprob": logprob, "bytes": list(texts.bytes_of(token))}

    return {"content": [{**entry(c.token, c.logprob), "top_logprobs": [entry(t, lp) for t, lp in (c.top or [])]} for c in choices]}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(rid: str, model: str, choices: list[dict], use: dict | None, chunk: bool) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_choice(index: int, text: str | None, logprobs: dict | None, finish_reason: str | None, chunk: bool, first: bool = False) -> dict:
    if chunk:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text is not None else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_body(rid: str, model: str, choices: list[dict], use: dict | None, chunk: bool) -> dict:
    body = {
        "id": rid,
        "object": "chat.completion.chunk" if chunk else "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if use is not None or not chunk:
        body["usage"] = use
    return body


def usage_chunk(rid: str, model: str, chat: bool, use: dict) -> dict:
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [], "usage": use}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
