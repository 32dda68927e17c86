"""One model behind `dllm serve`, asked by the official `openai` client: a completion, the same one streamed (time to
first chunk, chunks), and a chat reply; printed as a markdown section for the docs.

    python benchmarks/serve_openai.py runs/smollm2 --backend torch --max-tokens 32
    python benchmarks/serve_openai.py runs/serve/bd3 --steps 2

The server is a real process (`python -m jetson_dllm serve MODEL`) on a free port of 127.0.0.1, stopped with SIGTERM
at the end (its exit status is printed: 0 when it drained and stopped cleanly).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--backend", default="auto")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=0, help="steps (per block for BD3) where the family uses steps")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chat", default="Tell me a short story about a cat.", help="the user's message (a story model continues it)")
    args = p.parse_args()
    from openai import OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "jetson_dllm", "serve", args.model, "--port", str(port), "--backend", args.backend,
                             "--threads", str(args.threads), "--model-name", "m"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
            if proc.poll() is not None:
                raise SystemExit(f"the server did not start: {proc.stderr.read().strip().splitlines()[-1]}")
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0]
        extra = {"steps": args.steps} if args.steps else {}
        t0 = time.perf_counter()
        out = client.completions.create(model="m", prompt=args.prompt, max_tokens=args.max_tokens, temperature=0, seed=1, extra_body=extra)
        whole_s = time.perf_counter() - t0
        t0, first, chunks, text = time.perf_counter(), None, 0, ""
        for chunk in client.completions.create(model="m", prompt=args.prompt, max_tokens=args.max_tokens, temperature=0, seed=1, stream=True,
                                               extra_body=extra):
            if chunk.choices[0].text and first is None:
                first = time.perf_counter() - t0
            chunks, text = chunks + 1, text + chunk.choices[0].text
        stream_s = time.perf_counter() - t0
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": args.chat}],
                                              max_tokens=args.max_tokens, temperature=0, seed=1, extra_body=extra)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    load = os.getloadavg()[0]
    print(f"**{args.model}** ({model.family}, context {model.context}, backend {args.backend}; load {load:.1f}): "
          f"{out.usage.completion_tokens} tokens in {whole_s * 1e3:,.0f} ms; streamed: first text after {(first or stream_s) * 1e3:,.0f} ms, "
          f"{chunks} chunks in {stream_s * 1e3:,.0f} ms, {'the same text' if text == out.choices[0].text else 'A DIFFERENT TEXT'}; "
          f"server exit status after SIGTERM {code}\n")
    print(f"> {args.prompt}{out.choices[0].text}\n")
    print(f"chat ({args.chat!r}): > {chat.choices[0].message.content.strip()}")


if __name__ == "__main__":
    main()
