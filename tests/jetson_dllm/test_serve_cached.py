"""`dllm serve` of the cached families, as real server processes: a block-diffusion bundle and the AR baseline behind
the OpenAI API, with per-request cache slots (continuous batching), streaming, stop sequences and what each family
refuses."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from conftest import CHROMIUM, Server, browser_page, concurrently, server_fixture

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install 'jetson-dllm[dev]')")
pytest.importorskip("fastapi", reason="the server needs the [serve] extra")


bd3_server = server_fixture("bd3_bundle", "--max-batch", "8")


ar_server = server_fixture("ar_bundle", "--max-batch", "8")


def _client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("which", ["bd3_server", "ar_server"])
def test_the_openai_client_gets_completions_streams_and_chat(which, request):
    server = request.getfixturevalue(which)
    client = _client(server)
    model = client.models.list().data[0]
    assert model.id == "tiny" and model.family == ("bd3" if which == "bd3_server" else "ar") and model.context == 64
    knobs = {"steps": 4} if which == "bd3_server" else {}
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, n=2, seed=5, temperature=0, extra_body=knobs)
    assert [c.index for c in out.choices] == [0, 1] and all(c.finish_reason in ("stop", "length") for c in out.choices)
    assert out.choices[0].text == out.choices[1].text  # greedy: both rows alike
    pieces = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, seed=5, temperature=0, stream=True,
                                            extra_body=knobs))
    assert "".join(p.choices[0].text for p in pieces) == out.choices[0].text  # the stream adds up to the whole text
    assert pieces[-1].choices[0].finish_reason == out.choices[0].finish_reason
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=16,
                                          extra_body=knobs)
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)


@pytest.mark.parametrize("which, body, match", [
    ("bd3_server", {"suffix": "The end."}, "cannot fill a gap"),
    ("bd3_server", {"deadline_ms": 5}, "deadline_ms does not apply"),
    ("ar_server", {"steps": 8}, "steps does not apply"),
    ("ar_server", {"canvas": True, "stream": True}, "canvas does not apply"),
    ("ar_server", {"max_tokens": 200}, "context holds 64"),
])
def test_what_a_family_cannot_do_is_refused_with_the_reason(which, body, match, request):
    server = request.getfixturevalue(which)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8, **body}, timeout=30)
    assert r.status_code == 400 and match in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("which", ["bd3_server", "ar_server"])
def test_a_stop_sequence_ends_the_request_and_is_never_streamed(which, request):
    server = request.getfixturevalue(which)
    body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "seed": 1, **({"steps": 4} if which == "bd3_server" else {})}
    whole = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert len(whole) >= 6, whole
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]  # met half way (or earlier, where it first occurs)
    cut = httpx.post(f"{server.url}/v1/completions", json={**body, "stop": [stop, "never said"]}, timeout=60).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == whole[: whole.find(stop)]
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stop": [stop, "never said"], "stream": True}, timeout=60) as r:
        chunks = [json.loads(ln[6:])["choices"][0] for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert "".join(c["text"] for c in chunks) == cut["text"] and chunks[-1]["finish_reason"] == "stop"


@pytest.mark.parametrize("which", ["bd3_server", "ar_server"])
def test_concurrent_clients_share_calls_and_every_slot_comes_back(which, request):
    server = request.getfixturevalue(which)

    def one(i):
        body = {"prompt": "Once upon a time" * (i % 3), "max_tokens": 8 + 4 * (i % 4), "seed": i}
        r = httpx.post(f"{server.url}/v1/completions", json={**body, **({"steps": 4} if which == "bd3_server" else {})}, timeout=120)
        return r.status_code, r.headers.get("retry-after")

    results = concurrently(one, 32)
    assert None not in results and all(s == 200 or (s == 429 and ra) for s, ra in results)
    assert sum(s == 200 for s, _ in results) >= 16
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    value = {ln.split()[0]: float(ln.split()[-1]) for ln in metrics.splitlines() if ln and not ln.startswith("#")}
    assert value["dllm_batch_rows_sum"] > value["dllm_batch_rows_count"]  # calls with several requests' rows
    assert value["dllm_slots"] == 8 and value["dllm_slots_in_use"] == 0
    assert value["dllm_time_to_first_call_seconds_count"] >= 16
    health = httpx.get(f"{server.url}/health", timeout=5).json()
    assert health["active"] == 0 and health["slots_in_use"] == 0


def test_a_client_that_leaves_mid_stream_frees_its_slot(bd3_server):
    body = {"prompt": "Once", "max_tokens": 48, "steps": 16, "stream": True, "n": 3}
    with httpx.stream("POST", f"{bd3_server.url}/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # one event, then hang up
    deadline = time.time() + 30
    while time.time() < deadline and httpx.get(f"{bd3_server.url}/health", timeout=5).json()["slots_in_use"]:
        time.sleep(0.2)
    assert httpx.get(f"{bd3_server.url}/health", timeout=5).json()["slots_in_use"] == 0


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium; .ci/run installs it)")
def test_the_page_shows_the_blocks_filling_left_to_right_in_a_real_browser(bd3_server, tmp_path):
    with browser_page(bd3_server.url + "/") as page:
        page.wait_for_function("document.getElementById('model').textContent.includes('block diffusion')")
        assert page.inner_text("#stepsname") == "steps per block"
        # every redraw of the canvas: how many positions it shows (draw is the page script's global function; several
        # chunks may arrive in one read, so counting DOM mutations would merge them)
        page.evaluate("""() => { window.widths = [];
            const drawn = window.draw;
            window.draw = (view) => { window.widths.push(view.pieces.length); drawn(view); }; }""")
        page.fill("#prompt", "Once upon a time")
        page.fill("#max_tokens", "40")
        page.fill("#steps", "4")
        page.fill("#temperature", "0")  # greedy: this briefly trained model writes no end-of-text, so every block comes
        page.click("#go")
        status = "document.getElementById('status').textContent"
        page.wait_for_function(f"{status}.startsWith('done') || {status}.startsWith('error')", timeout=90_000)
        assert page.inner_text("#status").startswith("done"), page.inner_text("#status")
        widths = [w for w in page.evaluate("window.widths") if w]
        assert page.locator("#canvas .mask").count() == 0 and page.inner_text("#text").startswith("Once upon a time")
    assert widths == sorted(widths) and len(set(widths)) >= 2, widths  # the text grows, block by block, never shrinks


@pytest.mark.slow
def test_a_thousand_requests_leak_no_slot_and_no_memory(ar_bundle):
    psutil = pytest.importorskip("psutil")
    s = Server(ar_bundle, "--max-batch", "8", "--max-queue", "64")
    failed = []
    try:
        def burst(count: int, offset: int) -> None:
            def one(i):
                with httpx.Client(timeout=60) as http:
                    for j in range(i, count, 8):
                        body = {"prompt": "Once upon a time"[: (offset + j) % 16], "max_tokens": 2 + (j % 3), "seed": j, "stream": j % 2 == 0}
                        r = http.post(f"{s.url}/v1/completions", json=body)
                        if r.status_code != 200:
                            failed.append(r.text)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)

        burst(100, 0)  # warm: the allocator and the buffers of every batch size settle
        warm = psutil.Process(s.proc.pid).memory_info().rss
        burst(1000, 100)
        assert not failed, failed[:3]
        grown = psutil.Process(s.proc.pid).memory_info().rss - warm
        value = {ln.split()[0]: float(ln.split()[-1]) for ln in httpx.get(f"{s.url}/metrics", timeout=5).text.splitlines() if ln and not ln.startswith("#")}
        assert value["dllm_slots_in_use"] == 0 and httpx.get(f"{s.url}/health", timeout=5).json()["active"] == 0
        assert value['dllm_requests_total{endpoint="/v1/completions",status="200"}'] >= 1100
        assert grown < 24 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 1,000 requests"
    finally:
        s.stop()


def test_a_full_pool_and_queue_answer_429_with_retry_after(bd3_bundle):
    """Two slots and a queue of one: of eight simultaneous requests some are refused at once with Retry-After,
    the rest are answered, and the slots all come back."""
    s = Server(bd3_bundle, "--max-batch", "2", "--max-queue", "1")
    try:
        def one(i):
            r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Once", "max_tokens": 40, "steps": 4, "seed": i}, timeout=120)
            return r.status_code, r.headers.get("retry-after")

        results = concurrently(one, 8)
        assert sorted({status for status, _ in results}) == [200, 429], results
        assert all(ra == "1" for status, ra in results if status == 429)
        assert httpx.get(f"{s.url}/health", timeout=5).json()["slots_in_use"] == 0
    finally:
        s.stop()
