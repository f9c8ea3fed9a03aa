"""The Serve application of `tiered serve`: a FastAPI ingress deployment in front of the cluster's
SessionReplicas, routed by the cluster's own SessionRouter (no second router).

    build(args) -> serve.Application      args: ServeSettings fields (a Serve config's `args`)

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions. With API
keys configured, every route but /health needs `Authorization: Bearer KEY` (401 otherwise).
Errors are OpenAI-shaped (errors.py). Streaming answers are server-sent events ending in
`data: [DONE]`; an error after the stream started is one `data: {"error": ...}` event before it.
"""


import dataclasses
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from runtime.cluster.cluster import replica_deployment

from . import schema
from .backend import ReplicaBackend
from .engine import Engine, Generation, Outcome, tenant_salt
from .errors import APIError, bad_request, from_exception
from .settings import ServeSettings

SESSION_HEADER = "x-session-id"
CHAT_ROLES = {"developer": "system"}  # roles a chat template may not know -> the one it does

app = FastAPI(title="tiered", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@app.exception_handler(RequestValidationError)
@app.exception_handler(HTTPException)
async def _other_error(request: Request, error: Exception) -> JSONResponse:
    answer = from_exception(error)
    return JSONResponse(answer.body(), status_code=answer.status)


@contextmanager
def answering() -> Iterator[None]:
    """Any failure inside becomes an APIError (503 when no replica can take the request)."""
    try:
        yield
    except APIError:
        raise
    except Exception as error:
        raise from_exception(error) from error


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    if first:
        yield first
    yield from rest


def _guarded(texts: Iterator[str]) -> Iterator[str]:
    """`texts`, its failures as APIError."""
    with answering():
        yield from texts


def _event(body) -> str:
    return f"data: {body.model_dump_json(exclude_none=True)}\n\n"


def _sse(events: Iterator[str]) -> StreamingResponse:
    def framed() -> Iterator[str]:
        try:
            yield from events
        except APIError as error:  # the status line is sent: the error is an event
            yield f"data: {JSONResponse(error.body()).body.decode()}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(framed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    """replicas   the SessionReplica deployment's handle; settings   ServeSettings fields"""

    def __init__(self, replicas: DeploymentHandle, settings: dict) -> None:
        self.settings = ServeSettings(**settings)
        self.backend = ReplicaBackend(replicas, self.settings.table_key, self.settings.routing,
                                      self.settings.block_tokens, self.settings.call_timeout_s,
                                      self.settings.failover_timeout_s)
        self.engine = Engine(self.backend, no_reuse=self.settings.no_reuse)
        self.created_s = int(time.time())

    @app.get("/health")
    def health(self) -> dict:
        with answering():
            info = self.backend.model_info()
        return {"status": "ok", "model": self.settings.model_id, "max_model_len": info["max_tokens"]}

    @app.get("/v1/models")
    def models(self, request: Request) -> dict:
        self._api_key(request)
        with answering():
            info = self.backend.model_info()
        card = schema.ModelCard(id=self.settings.model_id, created=self.created_s, max_model_len=info["max_tokens"])
        return schema.ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions")
    def chat_completions(self, body: schema.ChatCompletionRequest, request: Request):
        key = self._api_key(request)
        self._check_model(body.model)
        messages = [{"role": CHAT_ROLES.get(m.role, m.role), "content": m.text()} for m in body.messages]
        with answering():
            try:
                prompt_ids = self.backend.tokenizer.apply_chat_template(messages)
            except (ValueError, TypeError) as error:
                raise bad_request(f"messages: {error}", "messages") from error
        gen, outcome = self._generation(body, prompt_ids, key, request), Outcome()
        texts, first = self._start(gen, outcome)
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        if not body.stream:
            text = first + "".join(texts)
            choice = schema.ChatChoice(message=schema.AssistantMessage(content=text), finish_reason=outcome.finish_reason)
            return schema.ChatCompletion(id=reply_id, model=self.settings.model_id, choices=[choice],
                                         usage=self._usage(gen, outcome)).model_dump()

        def chunk(delta: schema.Delta, finish_reason: str | None = None) -> str:
            choice = schema.ChunkChoice(delta=delta, finish_reason=finish_reason)
            return _event(schema.ChatCompletionChunk(id=reply_id, model=self.settings.model_id, choices=[choice]))

        def events() -> Iterator[str]:
            yield chunk(schema.Delta(role="assistant", content=""))
            for text in _chain(first, texts):
                yield chunk(schema.Delta(content=text))
            yield chunk(schema.Delta(), outcome.finish_reason)
            if body.include_usage:
                yield _event(schema.ChatCompletionChunk(id=reply_id, model=self.settings.model_id, choices=[],
                                                        usage=self._usage(gen, outcome)))

        return _sse(events())

    @app.post("/v1/completions")
    def completions(self, body: schema.CompletionRequest, request: Request):
        key = self._api_key(request)
        self._check_model(body.model)
        with answering():
            prompt_ids = self._prompt_ids(body.prompt)
        gen, outcome = self._generation(body, prompt_ids, key, request), Outcome()
        texts, first = self._start(gen, outcome)
        reply_id = f"cmpl-{uuid.uuid4().hex}"
        model = self.settings.model_id
        if not body.stream:
            choice = schema.CompletionChoice(text=first + "".join(texts), finish_reason=outcome.finish_reason)
            return schema.Completion(id=reply_id, model=model, choices=[choice], usage=self._usage(gen, outcome)).model_dump()

        def events() -> Iterator[str]:
            for text in _chain(first, texts):
                yield _event(schema.Completion(id=reply_id, model=model, choices=[schema.CompletionChoice(text=text)]))
            last = schema.CompletionChoice(text="", finish_reason=outcome.finish_reason)
            yield _event(schema.Completion(id=reply_id, model=model, choices=[last]))
            if body.include_usage:
                yield _event(schema.Completion(id=reply_id, model=model, choices=[], usage=self._usage(gen, outcome)))

        return _sse(events())

    # -- helpers --------------------------------------------------------------------------------

    def _api_key(self, request: Request) -> str | None:
        """The caller's API key (None when the server has none); 401 unless it is one of them."""
        if not self.settings.api_keys:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.settings.api_keys:
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        return key.strip()

    def _check_model(self, model: str) -> None:
        if model != self.settings.model_id:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.settings.model_id!r}",
                           "model", "model_not_found")

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.backend.tokenizer.encode(prompt)
        vocab = self.backend.tokenizer.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"prompt: token ids must be in [0, {vocab}), got {bad[:3]}", "prompt")
        return list(prompt)

    def _generation(self, body: schema._Sampling, prompt_ids: list[int], key: str | None, request: Request) -> Generation:
        with answering():
            max_tokens = self.engine.check_prompt(prompt_ids, body.max_tokens or self.settings.default_max_tokens)
        pin = request.headers.get(SESSION_HEADER) or body.user
        return Generation(prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=body.temperature, seed=body.seed, top_p=body.top_p,
                          stop=body.stop_strings(), salt=tenant_salt(key, body.cache_salt), pin=pin)

    def _start(self, gen: Generation, outcome: Outcome) -> tuple[Iterator[str], str]:
        """Run the prompt and the first token now, so their failures are HTTP errors, not stream events."""
        texts = self.engine.run(gen, outcome)
        with answering():
            first = next(texts, "")
        return _guarded(texts), first

    @staticmethod
    def _usage(gen: Generation, outcome: Outcome) -> schema.Usage:
        return schema.usage(len(gen.prompt_ids), outcome.completion_tokens, outcome.cached_tokens)


def build(args: dict) -> serve.Application:
    """The application: the Ingress bound to `settings.workers` SessionReplicas of `settings.model`.

    args: ServeSettings fields (validated; an error names the field). Ray must be up when GPUs are
    to be found (the replicas then take one GPU each)."""
    settings = ServeSettings.load(**(args or {}))  # TIERED_<SETTING> variables under the args
    if settings.table_key == ServeSettings.model_fields["table_key"].default:
        settings = settings.model_copy(update={"table_key": f"tiered-serve-{uuid.uuid4().hex[:12]}"})
    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else torch.cuda.device_count()
    store_config = settings.store_config()
    if gpus:
        store_config = dataclasses.replace(store_config, device="cuda")
    if settings.shared_dir is not None:
        shared = Path(settings.shared_dir).expanduser().resolve()
        shared.mkdir(parents=True, exist_ok=True)
        store_config = dataclasses.replace(store_config, shared_dir=str(shared))
    replicas = replica_deployment(settings.workers, gpus > 0, settings.cpus_per_worker, settings.table_key,
                                  settings.routing).bind(settings.model, store_config, "float32",
                                                         "cuda" if gpus else "cpu",
                                                         {"step_tokens": settings.step_tokens,
                                                          "max_sequences": settings.max_sequences})
    return Ingress.bind(replicas, settings.model_dump())
