"""Process-level utilities shared by every layer: memory readings, thread limits, NeMo's logging."""
