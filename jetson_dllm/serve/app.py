"""`dllm serve`: an OpenAI-compatible HTTP API over one runner (FastAPI on uvicorn), and the live canvas page.

FastAPI because the request and response models are pydantic (validation and the error's field for free), it
is Starlette underneath (streaming responses, static files, middleware) and uvicorn drains in-flight requests on
SIGTERM. Routes: POST /v1/completions and /v1/chat/completions (streaming as server-sent events), GET /v1/models,
/health, /metrics (Prometheus), and / (the page).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from jetson_dllm.errors import DllmError
from jetson_dllm.families import SAMPLER_OPTIONS, family_of
from jetson_dllm.sampler import SamplerConfig
from jetson_dllm.serve.batcher import Batcher, Job, QueueFull
from jetson_dllm.serve.metrics import Metrics
from jetson_dllm.serve.schemas import ChatRequest, CompletionRequest, chat_prompt, error_body
from jetson_dllm.serve.text import canvas_view, cut_at_stop, generated, safe_to_send
from jetson_dllm.speculative import open_drafter
from jetson_dllm.speculative import serve_calls as speculative_calls

STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, kind, param, code), headers


def create_app(runner, model_name: str, api_key: str | None = None, max_batch: int = 16, max_queue: int = 64, batching: bool = True,
               max_body: int = 1 << 20, timeout_s: float = 120.0, drafter=None, draft_steps: int = 1) -> FastAPI:
    """The app over an open runner (and a drafter's, for speculative decoding: every request is then written by the
    parent with the drafter proposing); the batcher starts and drains with the app's lifespan."""
    server = Server(runner, model_name, api_key, max_batch, max_queue, batching, timeout_s, drafter, draft_steps)

    @asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        yield
        server.batcher.stop(drain_s=timeout_s)  # uvicorn has stopped taking requests: finish the admitted ones

    app = FastAPI(title="jetson-dllm", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_exception_handler(ApiError, server.api_error)
    app.add_exception_handler(RequestValidationError, server.invalid)
    app.add_exception_handler(StarletteHTTPException, server.http_error)  # the framework's own 404, 405, 400...
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat_completions)
    for path in ("/v1/completions", "/v1/chat/completions"):  # another method: 405 (not the page's 404)
        app.api_route(path, methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False)(server.post_only)
    app.get("/v1/models")(server.models)
    app.get("/v1/info")(server.info)
    app.get("/health")(server.health)
    app.get("/metrics")(server.prometheus)
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


class Server:
    """The routes' state and logic: the runner's tokenizer, the batcher, the metrics, the limits."""

    def __init__(self, runner, model_name: str, api_key: str | None, max_batch: int, max_queue: int, batching: bool, timeout_s: float,
                 drafter=None, draft_steps: int = 1):
        self.runner, self.model_name, self.api_key, self.max_batch, self.timeout_s = runner, model_name, api_key, max_batch, timeout_s
        self.family = family_of(runner.cfg)
        self.module = self.family.runtime_module()  # its serve_calls: a request as graph calls
        self.drafter, self.draft_steps = drafter, draft_steps
        if drafter is not None:
            open_drafter(runner, drafter, draft_steps)  # the pair checked before serving
        self.metrics = Metrics()
        self.batcher = Batcher(runner, max_batch=max_batch, max_queue=max_queue, batching=batching, observe=self.metrics.observe, drafter=drafter)
        self.metrics.slots_total.set(max_batch if self.batcher.cached else 0)
        self.tok = runner.tokenizer

    # --- errors and checks ------------------------------------------------------------------------------------

    async def post_only(self, request: Request):
        raise StarletteHTTPException(405, headers={"Allow": "POST"})

    async def api_error(self, request, exc: ApiError):
        self.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    async def http_error(self, request, exc: StarletteHTTPException):
        """The framework's errors (an unknown path, a wrong method, a body it could not parse) in OpenAI's shape."""
        self.metrics.requests.labels(request.url.path, str(exc.status_code)).inc()
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no such path: {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def invalid(self, request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        self.metrics.requests.labels(request.url.path, "400").inc()
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("the request body is not valid JSON"), status_code=400)
        param = next((str(p) for p in first["loc"] if p != "body"), None)
        where = ".".join(str(p) for p in first["loc"] if p != "body" and not _TYPE_TAG.match(str(p)))  # messages.0.name
        return JSONResponse(error_body(f"{where + ': ' if where else ''}{first['msg']}", param=param), status_code=400)

    def authorize(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error", code="invalid_api_key")

    def check_model(self, name: str | None) -> None:
        if name not in (None, self.model_name):
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}", param="model", code="model_not_found")

    # --- generation -------------------------------------------------------------------------------------------

    def check_knobs(self, body, suffix) -> None:
        """Refuse what this model's family cannot do: infilling for a left-to-right family, diffusion knobs it does
        not use (each with the reason), rather than ignore them."""
        if suffix and not self.family.infilling:
            how = "writes left to right" if self.family.left_to_right else "continues a prompt (it was not trained to fill gaps)"
            raise ApiError(400, f"suffix: the {self.family.title} {how} and cannot fill a gap; leave suffix out", param="suffix")
        unused = sorted((body.model_fields_set & set(SAMPLER_OPTIONS)) - set(self.family.options))
        if getattr(body, "canvas", False) and not self.family.steps:
            unused = ["canvas", *unused]
        if unused:
            uses = f"it uses {', '.join(self.family.options)}" if self.family.options else "one network call per token: it takes no diffusion knobs"
            raise ApiError(400, f"{unused[0]} does not apply to the {self.family.title} ({uses}); leave it out", param=unused[0])
        if "guidance_schedule" in body.model_fields_set and not getattr(body, "guidance", 0):
            raise ApiError(400, "guidance_schedule shapes guidance over the steps; give guidance too, or leave it out", param="guidance_schedule")

    def jobs_for(self, prompts: list[str], suffix, max_tokens: int, knobs, n: int, seed, stop, queue_put) -> list[dict]:
        rows = n * (2 if knobs.guidance else 1)  # guidance runs an unguided twin of each row (prompt masked, or condition dropped)
        if rows > self.max_batch:
            twin = " (guidance doubles the rows)" if knobs.guidance else ""
            raise ApiError(400, f"n={n} is more than this server generates at once (--max-batch {self.max_batch}){twin}", param="n")
        self.check_knobs(knobs, suffix)
        out = []
        for i, prompt in enumerate(prompts):
            emit = lambda kind, value, i=i: queue_put((i, kind, value))  # noqa: E731
            try:
                cfg = SamplerConfig.from_values(knobs, seed=seed if seed is not None else random.randrange(2**31))
                watch = (lambda view, step, emit=emit: emit("step", (view.copy(), step))) if knobs.stream or stop else None  # (the loop goes on changing the view)
                served = (self.module.serve_calls(self.runner, prompt, suffix, max_tokens, n, cfg, on_step=watch) if self.drafter is None  # steps only for a stream or a stop
                          else speculative_calls(self.runner, self.drafter, self.draft_steps, prompt, max_tokens, n, cfg, on_step=watch))
            except DllmError as e:  # a setting (guidance without a prompt, the prompt's text), or what prompt and max_tokens need
                if e.option:  # the request's field, as the API spells it ("--guidance-schedule" -> guidance_schedule)
                    raise ApiError(400, str(e).replace("--", ""), param=e.option.lstrip("-").replace("-", "_")) from None
                raise ApiError(400, f"{e} (max_tokens {max_tokens})", param="max_tokens") from None
            job = Job(served, rows, emit=emit, timeout_s=self.timeout_s)
            out.append({"job": job, "fixed": served.fixed, "stop": stop, "max_tokens": max_tokens, "sent": [""] * n, "done": False,
                        "steps": knobs.steps})
        for entry in out:
            try:
                self.batcher.submit(entry["job"])
            except QueueFull:
                for other in out:
                    other["job"].cancelled.set()
                raise ApiError(429, "the server is busy; retry shortly", "rate_limit_error", headers={"Retry-After": "1"}) from None
        self.metrics.queue.set(self.batcher.depth())
        return out

    async def run_jobs(self, request: Request, body, prompts: list[str], suffix, max_tokens: int, chat: bool):
        self.authorize(request)
        self.check_model(body.model)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        entries = self.jobs_for(prompts, suffix, max_tokens, body, body.n, body.seed, body.stop,
                           lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return StreamingResponse(self.stream(request, entries, events, ident, created, chat, getattr(body, "canvas", False)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices = await self.collect(request, entries, events)
        return self.response(entries, choices, ident, created, chat)

    async def next_event(self, request: Request, entries, events):
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():  # the client left: free its rows
                    for e in entries:
                        e["job"].cancelled.set()
                    raise ApiError(499, "client disconnected") from None

    def finished_choices(self, entry, tokens) -> list[dict]:
        rows = []
        for r in range(tokens.shape[0]):
            text, ended = generated(tokens[r], entry["fixed"][r][: tokens.shape[1]], self.tok, True, entry["max_tokens"])
            text, stopped = cut_at_stop(text, entry["stop"])
            rows.append({"text": text, "finish_reason": "stop" if ended or stopped else "length", "tokens": len(self.tok.encode(text))})
        self.metrics.tokens.inc(sum(c["tokens"] for c in rows))
        return rows

    def partial(self, entry, view) -> list[tuple[str, bool]]:
        """(text so far that will not change, whether it met a stop sequence) of each row of a step's view."""
        out = []
        for r in range(view.shape[0]):
            text, _ = generated(view[r], entry["fixed"][r][: view.shape[1]], self.tok, False, entry["max_tokens"])
            out.append(cut_at_stop(text, entry["stop"]))
        return out

    async def collect(self, request: Request, entries, events) -> dict:
        choices = {}
        while len(choices) < len(entries):
            i, kind, value = await self.next_event(request, entries, events)
            if i in choices:
                continue
            if kind == "step" and entries[i]["stop"]:
                texts = self.partial(entries[i], value[0])
                if all(stopped for _, stopped in texts):  # every row met a stop sequence: done, its rows freed now
                    entries[i]["job"].cancelled.set()
                    choices[i] = [{"text": t, "finish_reason": "stop", "tokens": len(self.tok.encode(t))} for t, _ in texts]
                    self.metrics.tokens.inc(sum(c["tokens"] for c in choices[i]))
                continue
            if kind == "error":
                for e in entries:
                    e["job"].cancelled.set()
                raise ApiError(504 if "timed out" in str(value) else 500, f"generation failed: {value}", "server_error")
            if kind == "done":
                choices[i] = self.finished_choices(entries[i], value)
        return choices

    def response(self, entries, choices, ident, created, chat) -> JSONResponse:
        n = entries[0]["job"].rows
        flat = [(i * n + r, c) for i in range(len(entries)) for r, c in enumerate(choices[i])]
        prompt_tokens = sum(int(e["fixed"][0].sum()) for e in entries)
        completion_tokens = sum(c["tokens"] for _, c in flat)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
        if chat:
            body = {"id": ident, "object": "chat.completion", "created": created, "model": self.model_name, "usage": usage,
                    "choices": [{"index": k, "message": {"role": "assistant", "content": c["text"]}, "finish_reason": c["finish_reason"]}
                                for k, c in flat]}
        else:
            body = {"id": ident, "object": "text_completion", "created": created, "model": self.model_name, "usage": usage,
                    "choices": [{"index": k, "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]} for k, c in flat]}
        self.metrics.requests.labels("/v1/chat/completions" if chat else "/v1/completions", "200").inc()
        return JSONResponse(body)

    def chunk(self, ident, created, chat, index, text, finish, extra=None) -> str:
        if chat:
            choice = {"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish}
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.model_name, "choices": [choice]}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            body = {"id": ident, "object": "text_completion", "created": created, "model": self.model_name, "choices": [choice]}
        if extra:
            body["dllm"] = extra
        return f"data: {json.dumps(body)}\n\n"

    async def stream(self, request, entries, events, ident, created, chat, with_canvas):
        """What is final, as it becomes final: the committed prefix of each sample, up to its first masked position."""
        n, left = entries[0]["job"].rows, len(entries)
        try:
            if chat:
                for i in range(len(entries) * n):
                    yield f"data: {json.dumps({'id': ident, 'object': 'chat.completion.chunk', 'created': created, 'model': self.model_name, 'choices': [{'index': i, 'delta': {'role': 'assistant'}, 'finish_reason': None}]})}\n\n"
            while left:
                try:
                    i, kind, value = await self.next_event(request, entries, events)
                except ApiError:  # the client left mid-stream: nobody to tell
                    return
                entry = entries[i]
                if entry["done"]:  # ended early (every row met a stop sequence): what comes after is not sent
                    continue
                if kind == "error":
                    yield f"data: {json.dumps(error_body(f'generation failed: {value}', 'server_error'))}\n\n"
                    left -= 1
                    continue
                if kind == "step":
                    view, step = value
                    texts = self.partial(entry, view)
                    for r, (text, stopped) in enumerate(texts):
                        text = text if stopped else safe_to_send(text, entry["stop"])
                        delta = text[len(entry["sent"][r]):] if text.startswith(entry["sent"][r]) else ""
                        extra = ({"step": step.index, "steps": entry["steps"], "evaluated": step.evaluated, "network_ms": step.network_ms,
                                  **canvas_view(view[r], step.committed[r], self.tok)} if with_canvas and step is not None else None)
                        if delta or extra:
                            entry["sent"][r] += delta
                            yield self.chunk(ident, created, chat, i * n + r, delta, None, extra)
                    if all(stopped for _, stopped in texts):  # every row is done: free its rows now
                        entry["done"], left = True, left - 1
                        entry["job"].cancelled.set()
                        for r in range(n):
                            yield self.chunk(ident, created, chat, i * n + r, "", "stop")
                    continue
                for r, c in enumerate(self.finished_choices(entry, value)):  # done: whatever is left, and why it ended
                    rest = c["text"][len(entry["sent"][r]):] if c["text"].startswith(entry["sent"][r]) else ""
                    yield self.chunk(ident, created, chat, i * n + r, rest, c["finish_reason"])
                left -= 1
            self.metrics.requests.labels("/v1/chat/completions" if chat else "/v1/completions", "200").inc()
            yield "data: [DONE]\n\n"
        finally:
            for e in entries:  # a client gone mid-stream frees its rows
                e["job"].cancelled.set()

    async def completions(self, body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts or len(prompts) * body.n > self.max_batch:
            raise ApiError(400, f"give 1..{self.max_batch // body.n} prompts at n={body.n} (--max-batch {self.max_batch})", param="prompt")
        return await self.run_jobs(request, body, prompts, body.suffix, body.max_tokens, chat=False)

    async def chat_completions(self, body: ChatRequest, request: Request):
        try:
            prompt = chat_prompt(body.messages, self.tok)
        except DllmError as e:
            raise ApiError(400, str(e), param="messages") from None
        return await self.run_jobs(request, body, [prompt], None, body.max_completion_tokens or body.max_tokens or 64, chat=True)

    async def models(self, request: Request):
        self.authorize(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "jetson-dllm", **self.limits()}]}

    def limits(self) -> dict:
        """What a client may ask of this model: its family, context, the most rows at once, what it can do."""
        cfg = self.runner.cfg
        return {"family": self.family.name, "family_title": self.family.title, "context": cfg.canvas_len, "max_batch": self.max_batch,
                "infilling": self.family.infilling, "knobs": list(self.family.options),
                **({"block_size": cfg.block_size} if self.family.attention == "block" else {})}

    async def health(self):
        return {"status": "ok", "model": self.model_name, "backend": self.runner.name, "queue": self.batcher.depth(), "active": len(self.batcher.active),
                "slots_in_use": self.batcher.slots_in_use()}

    async def prometheus(self):
        self.metrics.queue.set(self.batcher.depth())
        self.metrics.slots.set(self.batcher.slots_in_use())
        return PlainTextResponse(self.metrics.render(), media_type=self.metrics.content_type)

    async def info(self):
        """What the page needs: the model, its canvas lengths and the sampler's defaults."""
        return {"model": self.model_name, "backend": self.runner.name, "canvas_lengths": self.runner.canvas_lengths, "max_batch": self.max_batch,
                "api_key": bool(self.api_key), "drafter": self.drafter.name if self.drafter is not None else None,
                "draft_steps": self.draft_steps if self.drafter is not None else None, **self.limits()}


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|\[")  # a union member pydantic names in the location


class BodyLimit:
    """A pure ASGI middleware: request bodies over `limit` bytes get a 413 before they are read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        seen, over = 0, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True  # a body without Content-Length (chunked): refused as soon as it passes the limit
                raise _TooLarge
            return message

        async def unless_over(message):
            if not over:  # the framework may turn the read's error into its own 400: the 413 goes out instead
                await send(message)

        try:
            await self.app(scope, counted, unless_over)
        except _TooLarge:
            pass
        if over:
            await self._too_large(send)

    async def _too_large(self, send):
        body = json.dumps(error_body(f"the request body is larger than {self.limit:,} bytes", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
