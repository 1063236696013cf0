"""Weight-only quantization: int8 / int4 of a float model (quantize.py; GGUF Q8_0 / Q4_1 / Q4_0 blocks by default,
PyTorch's packed int8 / int4 layers otherwise), the block linears (blocks.py) multiplied by the C++ kernels of
:mod:`llamalab.kernels`, their common base (linear.py) and the rebuilding of saved layers (saved.py)."""
