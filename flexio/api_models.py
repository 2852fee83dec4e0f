"""JSON bodies <-> pydantic models: the requests and responses of the OpenAI- and Ollama-compatible API.

Field names and shapes follow the OpenAI API (openai-python's types) and Ollama's API docs; the
server's OpenAPI schema (/openapi.json) is generated from these, and the API fuzzer reads it.
Requests are validated strictly (a string is not a number, 1.0 is not an integer, as OpenAI's API
answers) and fields a client sends that flexio does not use are ignored (clients send many:
`user`, `logit_bias`, `presence_penalty`, `keep_alive`, ...).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- sampling fields shared by the OpenAI endpoints -------------------------------------------------

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False, description="0 = greedy; default 1 (OpenAI's)")]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False, description="nucleus sampling, 1 = off (default)")]
TopK = Annotated[int, Field(ge=0, description="extension: sample among the k most likely tokens, 0 = off (default)")]
Seed = Annotated[int, Field(ge=0, lt=2**64, description="sampling is reproducible for a given seed")]
Stop = str | Annotated[list[str], Field(max_length=4)]
MaxTokens = Annotated[int, Field(ge=0, description="default: the rest of the sequence's context")]


class StreamOptions(Request):
    include_usage: bool = False


class Sampled(Request):
    model: str | None = Field(None, description="the served model's id, file name or alias; absent: the served model")
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    stop: Stop | None = Field(None, description="up to 4 strings: the text ends before the first one generated")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1, description="choices per request: only 1")] | None = 1
    ignore_eos: bool | None = Field(False, description="extension (llama-server's): generate past end-of-text tokens")


class CompletionRequest(Sampled):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="the text to continue (a list of one string is accepted)")
    max_tokens: MaxTokens | None = None


class TextPart(Request):
    type: Literal["text"]
    text: str


Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(Request):
    role: Role
    content: str | list[TextPart] | None = None


class ChatRequest(Sampled):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = Field(None, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: MaxTokens | None = None


# --- OpenAI responses ----------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(Response):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(Response):
    """The body of a non-streamed completion, and (with text pieces and finish_reason None) each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Response):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(Response):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flexio"


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Response):
    error: ErrorBody


class Health(Response):
    status: Literal["ok", "loading", "error"]
    message: str | None = None


# --- llama-server's tokenizer endpoints ---------------------------------------------------------------


class TokenizeRequest(Request):
    content: str
    add_special: bool = Field(False, description="prepend BOS when the model's tokenizer does")
    parse_special: bool = Field(True, description="control-token text (e.g. <|im_start|>) becomes its one id")


class TokenizeResponse(Response):
    tokens: list[int]


class DetokenizeRequest(Request):
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(Response):
    content: str


# --- Ollama ---------------------------------------------------------------------------------------------


class OllamaOptions(Request):
    num_predict: int | None = Field(None, description="tokens to generate; negative: until the context is full")
    temperature: Temperature | None = Field(None, description="default 0.8 (Ollama's)")
    top_p: TopP | None = Field(None, description="default 0.9 (Ollama's)")
    top_k: TopK | None = Field(None, description="default 40 (Ollama's)")
    seed: Seed | None = None
    stop: Stop | None = None


class OllamaGenerateRequest(Request):
    model: str | None = None
    prompt: str = Field("", description="an empty prompt only answers that the model is loaded (done_reason 'load')")
    system: str | None = Field(None, description="system message for the chat template")
    raw: bool = Field(False, description="true: the prompt as is; false: wrapped in the model's chat template")
    stream: bool = True
    options: OllamaOptions | None = None


class OllamaMessage(Request):
    role: Role
    content: str = ""


class OllamaChatRequest(Request):
    model: str | None = None
    messages: Annotated[list[OllamaMessage], Field(min_length=1)]
    stream: bool = True
    options: OllamaOptions | None = None


class OllamaDone(Response):
    """Fields of the last object of an Ollama answer (durations in nanoseconds)."""

    done_reason: Literal["stop", "length", "load"] | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaGenerateResponse(OllamaDone):
    model: str
    created_at: str
    response: str
    done: bool


class OllamaChatResponse(OllamaDone):
    model: str
    created_at: str
    message: AssistantMessage
    done: bool


class OllamaModelDetails(Response):
    format: Literal["gguf"] = "gguf"
    family: str
    quantization_level: str


class OllamaModel(Response):
    name: str
    model: str
    modified_at: str
    size: int  # bytes of the GGUF file
    details: OllamaModelDetails


class OllamaTags(Response):
    models: list[OllamaModel]
