"""One network call of a bundle's first graph on onnxruntime, then the process's peak RSS as JSON: what `dllm
profile --measure` runs in a fresh process (jetson_dllm.profiler.measure_rss).

    python -m jetson_dllm.rss_probe BUNDLE PRECISION BATCH CANVAS
"""

from __future__ import annotations

import json
import sys

import numpy as np

from jetson_dllm.families import family_of
from jetson_dllm.profiler import peak_rss_ever
from jetson_dllm.runners.graphs import graph_spec, tensor_shapes
from jetson_dllm.runners.loaders import open_runner


def one_call(bundle_dir: str, precision: str, batch: int, canvas: int) -> None:
    """One call of the bundle's first graph at (batch, canvas): a canvas, or a block or a token over the whole cache
    (which a cached family allocates on its first call)."""
    with open_runner("onnx", bundle_dir, precision=precision) as runner:
        graph = runner.graphs[0]
        width = family_of(runner.cfg).positions_per_call(runner.cfg, canvas)
        shapes = tensor_shapes((graph,), runner.cfg, runner.topk, batch, width)
        feeds = {"tokens": np.full((batch, width), runner.cfg.mask_id, dtype=np.int32)}
        for name in graph_spec(graph, runner.cfg).inputs:  # the rest zeros: no soft input, level 0, zero latents
            feeds.setdefault(name, np.zeros(*shapes[name]))
        runner.run(graph, feeds)


if __name__ == "__main__":
    bundle, precision, batch, canvas = sys.argv[1:5]
    one_call(bundle, precision, int(batch), int(canvas))
    print(json.dumps(peak_rss_ever()))
