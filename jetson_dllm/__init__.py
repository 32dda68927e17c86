"""jetson-dllm: train masked-diffusion language models on a desktop, run them on a Jetson."""

__version__ = "0.1.0"
