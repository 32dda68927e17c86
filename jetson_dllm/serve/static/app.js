// The live canvas: POST /v1/completions with stream and canvas on, and draw every step as it arrives. A masked
// diffusion model's canvas fills anywhere; a block-diffusion model's grows block by block, left to right; the
// autoregressive baseline streams token by token (no canvas, no diffusion knobs).
"use strict";
const $ = (id) => document.getElementById(id);
let needsKey = false, knobs = ["steps", "strategy"], blockSize = 0;

fetch("v1/info").then((r) => r.json()).then((info) => {
  const longest = info.family === "mdlm" ? Math.max(...info.canvas_lengths) : info.context;
  const what = info.family === "mdlm" ? `canvas up to ${longest} tokens` : `context ${longest} tokens`;
  $("model").textContent = `${info.model} (${info.family_title || info.family}) on ${info.backend}, ${what}`;
  $("max_tokens").max = longest - 1;  // the prompt needs room too
  $("max_tokens").value = Math.min(+$("max_tokens").value, Math.floor(longest / 2));
  knobs = info.knobs || knobs;
  blockSize = info.block_size || 0;
  $("stepslabel").hidden = !knobs.includes("steps");
  $("strategylabel").hidden = !knobs.includes("strategy");
  if (blockSize) $("stepsname").textContent = "steps per block";
  needsKey = info.api_key;
  $("keylabel").hidden = !needsKey;
});

function draw(view) {
  const box = $("canvas");
  box.textContent = "";
  const fresh = new Set(view.new);
  view.pieces.forEach((piece, i) => {
    const span = document.createElement("span");
    if (piece === null) { span.textContent = "▒"; span.className = "mask"; }
    else { span.textContent = piece; if (fresh.has(i)) span.className = "new"; }
    box.appendChild(span);
  });
}

async function generate(event) {
  event.preventDefault();
  $("go").disabled = true;
  $("text").textContent = "";
  $("status").textContent = "waiting for the model…";
  const body = { prompt: $("prompt").value, max_tokens: +$("max_tokens").value, temperature: +$("temperature").value, seed: +$("seed").value, stream: true };
  if (knobs.includes("steps")) { body.steps = +$("steps").value; body.canvas = true; }
  if (knobs.includes("strategy")) body.strategy = $("strategy").value;
  const headers = { "content-type": "application/json" };
  if (needsKey) headers.authorization = `Bearer ${$("apikey").value}`;
  const started = performance.now();
  try {
    const response = await fetch("v1/completions", { method: "POST", headers, body: JSON.stringify(body) });
    if (!response.ok) {
      const err = await response.json();
      throw new Error(err.error ? err.error.message : response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", text = "", steps = 0, network = 0, chunks = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).replace(/^data: /, "");
        buffer = buffer.slice(cut + 2);
        if (line === "[DONE]") continue;
        const msg = JSON.parse(line);
        if (msg.error) throw new Error(msg.error.message);
        const choice = msg.choices[0];
        text += choice.text;
        chunks += 1;
        $("text").textContent = body.prompt + text;
        if (msg.dllm) {
          draw(msg.dllm);
          steps += 1;
          network += msg.dllm.network_ms;
          const where = blockSize ? `block ${Math.ceil(msg.dllm.pieces.length / blockSize)}, step ${msg.dllm.step}/${msg.dllm.steps}` : `step ${msg.dllm.step}/${msg.dllm.steps}`;
          $("status").textContent = `${where} · ${network.toFixed(0)} ms in the network · ${(performance.now() - started).toFixed(0)} ms`;
        } else if (!choice.finish_reason) {
          $("status").textContent = `${chunks} tokens · ${(performance.now() - started).toFixed(0)} ms`;
        }
        if (choice.finish_reason) {
          const work = body.canvas ? `${steps} steps (${choice.finish_reason}) · ${network.toFixed(0)} ms in the network` : `${chunks} chunks (${choice.finish_reason})`;
          $("status").textContent = `done in ${work} · ${(performance.now() - started).toFixed(0)} ms in all`;
        }
      }
    }
  } catch (e) {
    $("status").textContent = `error: ${e.message}`;
  } finally {
    $("go").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
