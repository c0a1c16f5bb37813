"""The bottom layer: errors, NeMo config and ``.nemo`` readers, safe file reading, system helpers."""
