"""The runtimes behind ``streaming_parity.interface.backend.Backend``: NeMo (the reference), ONNX Runtime,
MLX, and the peers sherpa-onnx and mlx-audio. Each imports only the interface and the core, never another
backend; ``streaming_parity.interface.registry`` names them (as module strings) for the layers above."""
