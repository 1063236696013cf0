// llamalab fused ops (norm): filled in by its own change; an empty translation unit until then.
