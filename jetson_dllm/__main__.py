"""`python -m jetson_dllm` is `dllm`."""

from jetson_dllm.cli import entry

entry()
