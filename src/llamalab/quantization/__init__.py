"""Weight-only quantization: int8 / int4 linears (quantize.py) and GGUF Q8_0 / Q4_0 / Q4_1 block linears (blocks.py),
multiplied by the C++ kernels of :mod:`llamalab.kernels`."""
