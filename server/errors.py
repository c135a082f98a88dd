"""Domain errors. The API maps each to the client's dialect (OpenAI object or Ollama's)."""

from __future__ import annotations


class LmxError(Exception):
    """An error with an HTTP status and an OpenAI-style type/code."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(LmxError):
    """The request is well-formed JSON but asks for something invalid."""


class ModelNotFound(LmxError):
    """No available model answers to that name."""

    status = 404
    code = "model_not_found"

    def __init__(self, name: str, *, hint: str = "") -> None:
        msg = f"The model '{name}' does not exist"
        super().__init__(msg + (f"; {hint}" if hint else "") + ".", param="model")


class ModelUnusable(LmxError):
    """The model is listed but its file cannot be loaded."""

    status = 422
    code = "model_unusable"


class ContextOverflow(LmxError):
    """The prompt does not fit the model's context window."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, limit: int, what: str = "prompt") -> None:
        super().__init__(
            f"This model's maximum context length is {limit} tokens, but the {what} has "
            f"{prompt_tokens} tokens. Shorten the input or load the model with a larger context.",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class QueueFull(LmxError):
    """Every slot is busy and the wait queue is full."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retry_after = 1


class EngineFailure(LmxError):
    """The engine failed on a request that was valid (out of memory, a decode error)."""

    status = 503
    type = "server_error"
    code = "engine_failure"


class Unauthorized(LmxError):
    """Missing or wrong API key."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(LmxError):
    """A valid key whose scope does not cover this route."""

    status = 403
    type = "permission_error"
    code = "insufficient_scope"


class RateLimited(LmxError):
    """A key's own limit (requests at once, tokens per request) was reached."""

    status = 429
    type = "rate_limit_error"
    code = "key_limit"

    def __init__(self, message: str, *, retry_after: int = 1, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class ModelTooLarge(LmxError):
    """The model cannot fit the memory budget even with nothing else loaded."""

    status = 507
    type = "server_error"
    code = "insufficient_memory"


class ModelsBusy(LmxError):
    """Room could not be made in time: the models that would be evicted are serving."""

    status = 503
    type = "server_error"
    code = "models_busy"


class NotFound(LmxError):
    """A repository, file or download that does not exist."""

    status = 404
    code = "not_found"


class ChatTemplateBroken(ModelUnusable):
    """The model's chat template failed on its own (ran too long, grew too big, did not
    compile, or broke the sandbox); the model is marked so until it is reloaded."""

    code = "chat_template_broken"

    def __init__(self, message: str) -> None:
        super().__init__(message, param=None)


class UpstreamUnavailable(EngineFailure):
    """An upstream server (another OpenAI-compatible server lmx forwards to) cannot be
    reached, or failed: lmx answers as a gateway does."""

    status = 502
    code = "upstream_unavailable"


class UpstreamError(LmxError):
    """An upstream server refused a request: its own message, with the status a client of lmx
    should see (the client's fault stays 4xx; the upstream's own faults become 502/503)."""

    code = "upstream_error"

    def __init__(self, message: str, *, status: int, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status = status
        if status == 429:
            self.type = "rate_limit_error"
        elif status >= 500:
            self.type = "server_error"
