// llamalab fused ops (attention): filled in by its own change; an empty translation unit until then.
