"""Runners: one interface over torch, onnxruntime and TensorRT (+pycuda), in the shape of Polygraphy's runners.

A runner executes named graphs (`run(graph, feeds)`): name-keyed numpy arrays in, name-keyed numpy arrays out,
so a parity check between runners is one loop over the same inputs (`jetson_dllm.parity.compare_runners`). The
graphs (`GRAPHS`) are the same for every runner; a bundle carries those of its family (jetson_dllm.families), a
runner says which it runs (`graphs`). A graph that reads or writes the key/value cache does so on a cache the runner
allocates and owns (numpy buffers bound once to onnxruntime, device memory on TensorRT, tensors on torch); the caller
passes only tokens and each row's valid length (`valid_len`, (B,) or one scalar for every row), never the cache.
Rows of one call may sit at different positions. Without `slots`, a call's B rows are the rows of a cache of B rows
(allocated on the first call of that batch size); with `slots` (B,) int32, they are rows of the cache pool that
`open_slots(n)` allocated once (the server: one request's rows per slot, requests at any position in one call).
Outputs are `topk_logprobs` (B, T, K) float32 and `topk_ids` (B, T, K) int32 (the sampling head), or `logits`
(B, T, vocab) from the canvas graph; they may be the runner's own buffers, valid until its next call.

A family's generation loop is a generator of `Call`s; `drive` runs one on a runner (the server interleaves many).
Each runner lives in its own module and imports its library there; loaders are plain functions
(`runner_from_checkpoint`, `onnx_runner_from_bundle`, `onnx_runner_from_file`, `trt_runner_from_bundle`). Every
runner is a context manager that closes itself.
"""
