"""`dllm serve` as a real server process on localhost: the official openai client, bad input, concurrency, a client
that leaves mid-stream, SIGTERM during a request, and the page in a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import httpx
import pytest
from conftest import CHROMIUM, Server, browser_page, server_fixture

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install 'jetson-dllm[dev]')")
pytest.importorskip("fastapi", reason="the server needs the [serve] extra")


server = server_fixture("bundle_dir", "--max-batch", "16")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


KNOBS = {"steps": 8}


def test_completions_chat_models_with_the_openai_client(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, n=3, seed=7, extra_body=KNOBS)
    assert len(out.choices) == 3 and [c.index for c in out.choices] == [0, 1, 2]
    assert all(isinstance(c.text, str) and c.finish_reason in ("stop", "length") for c in out.choices)
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens >= 0
    again = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, n=3, seed=7, extra_body=KNOBS)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seed: reproducible
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me about a dog."}], max_tokens=12,
                                          seed=1, extra_body=KNOBS)
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)


def test_streaming_sends_only_what_is_final_and_ends_like_the_whole_text(client):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, seed=3, extra_body=KNOBS)
    pieces, reasons = [], []
    for chunk in client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, seed=3, stream=True, extra_body=KNOBS):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == whole.choices[0].text and reasons[-1] == whole.choices[0].finish_reason
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A cat"}], max_tokens=8, stream=True,
                                               extra_body=KNOBS))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason in ("stop", "length")


def test_suffix_fills_the_gap_between_prompt_and_suffix(client, server):
    out = client.completions.create(model="tiny", prompt="Once upon a time", suffix="happily ever after.", max_tokens=6, seed=2,
                                    extra_body={"steps": 6, "canvas": False})
    assert isinstance(out.choices[0].text, str)
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"prompt": "Lily", "suffix": "the end.", "max_tokens": 5, "steps": 5,
                                                                    "stream": True, "canvas": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    views = [e["dllm"] for e in events if "dllm" in e]
    assert views and views[0]["pieces"].count(None) > views[-1]["pieces"].count(None)  # the gap fills in
    assert "the end" in "".join(p for p in views[-1]["pieces"] if p)


BAD = [
    ("malformed JSON", {"content": b"{not json"}, 400, "not valid JSON"),
    ("unknown model", {"json": {"model": "gpt-4", "prompt": "hi"}}, 404, "does not exist"),
    ("wrong type", {"json": {"prompt": 5}}, 400, "prompt"),
    ("temperature NaN", {"content": b'{"prompt": "hi", "temperature": NaN}'}, 400, "temperature"),
    ("max_tokens over the canvas", {"json": {"prompt": "hi", "max_tokens": 5000}}, 400, "longest canvas"),
    ("n over the cap", {"json": {"prompt": "hi", "n": 40}}, 400, "n"),
    ("unknown field", {"json": {"prompt": "hi", "frobnicate": 1}}, 400, "frobnicate"),
    ("oversized body", {"json": {"prompt": "x" * (2 << 20)}}, 413, "larger than"),
    ("strategy", {"json": {"prompt": "hi", "strategy": "beam"}}, 400, "strategy"),
    ("empty messages", {"json": {"messages": []}, "path": "/v1/chat/completions"}, 400, "messages"),
    ("echo is not silently ignored", {"json": {"prompt": "hi", "echo": True}}, 400, "echo"),
    ("a lone surrogate", {"content": b'{"prompt": "hi \\udcff there"}'}, 400, "not valid Unicode"),
    ("max_tokens: true is not a count", {"json": {"prompt": "hi", "max_tokens": True}}, 400, "max_tokens"),
    ("stream: 'yes' is not a boolean", {"json": {"prompt": "hi", "stream": "yes"}}, 400, "stream"),
    ("canvas: 'yes' is not a boolean", {"json": {"prompt": "hi", "canvas": "yes"}}, 400, "canvas"),
    ("steps: '8' is not a number", {"json": {"prompt": "hi", "steps": "8"}}, 400, "steps"),
    ("an unknown field inside a message", {"json": {"messages": [{"role": "user", "content": "hi", "name": "x"}]},
                                           "path": "/v1/chat/completions"}, 400, "name"),
    ("a chunked body over the limit, no Content-Length", {"content": (b"x" * (1 << 20) for _ in range(10))}, 413, "larger than"),
    ("guidance NaN", {"content": b'{"prompt": "hi", "guidance": NaN}'}, 400, "guidance"),
    ("guidance negative", {"json": {"prompt": "hi", "guidance": -1}}, 400, "guidance"),
    ("guidance with no prompt to guide toward", {"json": {"prompt": "", "guidance": 2}}, 400, "needs a prompt"),
    ("guidance doubles the rows past the cap", {"json": {"prompt": "hi", "guidance": 2, "n": 9}}, 400, "guidance doubles the rows"),
    ("an unknown guidance schedule", {"json": {"prompt": "hi", "guidance": 2, "guidance_schedule": "early"}}, 400, "guidance_schedule"),
    ("a guidance schedule without guidance", {"json": {"prompt": "hi", "guidance_schedule": "late"}}, 400, "give guidance too"),
    ("a lone surrogate in stop", {"content": b'{"prompt": "hi", "stop": ["ok", "\\udcff"]}'}, 400, "not valid Unicode"),
    ("a path that does not exist", {"json": {"prompt": "hi"}, "path": "/v1/engines"}, 405, "not allowed"),
    ("a method a route does not take", {"json": {}, "path": "/v1/models"}, 405, "not allowed"),
]


def test_a_guided_request_shares_the_batch_with_plain_ones(server):
    """A guided request (its twin rows asking for the logits) and plain ones at once: every one answered, the guided
    one continuing its prompt."""
    from conftest import concurrently

    def one(i):
        body = {"prompt": "Once upon a time", "max_tokens": 16, "steps": 8, "seed": i, **({"guidance": 2.0} if i == 0 else {})}
        return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)

    answers = concurrently(one, 4)
    assert all(r is not None and r.status_code == 200 for r in answers), [r and r.text for r in answers]
    assert all(r.json()["choices"][0]["text"].strip() for r in answers)


@pytest.mark.parametrize("what, request_kw, status, match", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_error_objects_and_the_server_keeps_serving(server, what, request_kw, status, match):
    path = request_kw.pop("path", "/v1/completions")
    r = httpx.post(f"{server.url}{path}", headers={"content-type": "application/json"}, timeout=30, **request_kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert match in error["message"] or match == error.get("param"), error
    assert set(error) >= {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"


def test_another_method_on_a_generation_route_is_405_naming_post(server):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.get(f"{server.url}{path}", timeout=30)
        assert r.status_code == 405 and r.headers["allow"] == "POST" and "GET is not allowed" in r.json()["error"]["message"], r.text


def test_a_chat_template_that_cannot_render_is_a_refusal_not_a_crash():
    """Rendering can raise more than Jinja's own errors (the sandbox's range limit, a type error in the template):
    each is one DllmError (the server's 400), never a 500."""
    from types import SimpleNamespace

    from jetson_dllm.errors import DllmError
    from jetson_dllm.serve.schemas import ChatMessage, chat_prompt

    tok = SimpleNamespace(tok=SimpleNamespace(id_to_token=lambda i: "<s>"), bos_id=1, eot_id=2)
    for template, match in (("{% for i in range(10**9) %}x{% endfor %}", "OverflowError"), ("{{ messages[0].content + 1 }}", "TypeError")):
        tok.chat_template = template
        with pytest.raises(DllmError, match=match):
            chat_prompt([ChatMessage(role="user", content="hi")], tok)


@pytest.mark.parametrize("content, param", [(b'{"prompt": "hi \\udcff there"}', "prompt"), (b'{"prompt": "", "guidance": 2}', "guidance")])
def test_a_refusal_from_the_library_names_the_request_field(server, content, param):
    """The library's errors say which setting they are about (DllmError.option); the server names that field."""
    r = httpx.post(f"{server.url}/v1/completions", headers={"content-type": "application/json"}, content=content, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and "--" not in r.json()["error"]["message"], r.text


def test_the_frameworks_own_errors_are_openai_errors(server):
    r = httpx.get(f"{server.url}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    assert httpx.get(f"{server.url}/", timeout=10).text.lstrip().lower().startswith("<!doctype html")  # the page still serves


def test_a_huge_refused_prompt_costs_the_server_no_memory(server):
    """A 900 KB prompt that cannot fit is refused before it is tokenized: the process stays as large as it was
    (tokenizing it first left it 90 MB larger); a normal request still runs after it."""
    import psutil

    process = psutil.Process(server.proc.pid)
    httpx.post(f"{server.url}/v1/completions", json={"prompt": "Once", "max_tokens": 4, "steps": 2}, timeout=60)  # warm
    before = process.memory_info().rss
    for _ in range(3):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Once upon a time " * 53000, "max_tokens": 8}, timeout=60)
        assert r.status_code == 400 and "at least" in r.json()["error"]["message"]
    assert process.memory_info().rss - before < 20 * 2**20
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "Once", "max_tokens": 4, "steps": 2}, timeout=60).status_code == 200


def test_api_key(bundle_dir):
    s = Server(bundle_dir, "--api-key", "sesame")
    try:
        for headers, status in [({}, 401), ({"authorization": "Bearer wrong"}, 401), ({"authorization": "Bearer sesame"}, 200)]:
            r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi", "max_tokens": 4, "steps": 2}, headers=headers, timeout=30)
            assert r.status_code == status, r.text
            if status == 401:
                assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{s.url}/v1/models", timeout=5).status_code == 401
    finally:
        s.stop()


def test_32_concurrent_clients_all_answered(server):
    results, lock = [], threading.Lock()

    def one(i):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Once", "max_tokens": 12, "steps": 6, "seed": i}, timeout=120)
        with lock:
            results.append((r.status_code, r.headers.get("retry-after"), r.json()))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert len(results) == 32  # no request lost
    for status, retry_after, body in results:
        assert status == 200 or (status == 429 and retry_after), body
    assert sum(s == 200 for s, _, _ in results) >= 16
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    rows = [ln for ln in metrics.splitlines() if ln.startswith("dllm_batch_rows_sum")]
    calls = [ln for ln in metrics.splitlines() if ln.startswith("dllm_batch_rows_count")]
    assert float(rows[0].split()[-1]) > float(calls[0].split()[-1])  # some network calls served several requests
    for name in ("dllm_requests_total", "dllm_generated_tokens_total", "dllm_network_evaluations_total", "dllm_step_seconds_bucket", "dllm_queue_depth"):
        assert name in metrics


def test_a_client_that_leaves_mid_stream_frees_its_rows(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"prompt": "Once", "max_tokens": 48, "steps": 400, "stream": True,
                                                                    "canvas": True}, timeout=60) as r:
        next(r.iter_lines())  # one event, then hang up
    deadline = time.time() + 30
    while time.time() < deadline and httpx.get(f"{server.url}/health", timeout=5).json()["active"]:
        time.sleep(0.2)
    assert httpx.get(f"{server.url}/health", timeout=5).json()["active"] == 0


def test_sigterm_drains_the_request_in_flight_then_exits(bundle_dir):
    s = Server(bundle_dir)
    answer = {}

    def slow():
        answer["r"] = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Once", "max_tokens": 48, "steps": 48}, timeout=120)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(1.0)
    s.proc.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    assert answer["r"].status_code == 200 and answer["r"].json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert s.proc.wait(timeout=60) == 0


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium; .ci/run installs it)")
def test_the_page_shows_the_canvas_filling_in_a_real_browser(server, tmp_path):
    with browser_page(server.url + "/") as page:
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
        page.fill("#prompt", "Once upon a time")
        assert int(page.input_value("#max_tokens")) <= 32  # capped by the model's canvas (64)
        page.fill("#steps", "16")
        page.click("#go")
        status = "document.getElementById('status').textContent"
        page.wait_for_function(f"{status}.startsWith('done') || {status}.startsWith('error')", timeout=90_000)
        assert page.inner_text("#status").startswith("done"), page.inner_text("#status")
        assert page.locator("#canvas span").count() > 10 and page.locator("#canvas .mask").count() == 0
        assert page.inner_text("#text").startswith("Once upon a time")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5000
    if os.environ.get("DLLM_SCREENSHOT"):
        shutil.copy(shot, os.environ["DLLM_SCREENSHOT"])
