"""streaming-parity: a cross-backend parity harness for NeMo cache-aware streaming FastConformer-RNNT models.

The folders are the layers, top to bottom; each imports only the ones below it (``lint-imports``):

- ``app``: the ``parity`` CLI and its commands, the compare session, nightly, demo, the pytest plugin;
- ``fixtures``: models built offline from NeMo configs, the fixture speech, the trained fixture;
- ``report`` and ``detect``: rendering results; fingerprinting and diagnosing artifacts;
- ``judge`` and ``backends``: comparing runs against tolerances; the runtimes behind the interface
  (NeMo, ONNX Runtime, MLX, peers), none of which imports another;
- ``interface``: the streaming ``Backend`` interface, chunking, front end, the backend registry;
- ``core``: errors, NeMo config and checkpoint readers, safe file reading, system helpers.
"""
