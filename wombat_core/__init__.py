"""Wombat core library, the domain: checkpoints and deltas, manifests and atomic output, tokenizer and
prompts, the generation engine, and the RRHF math, data and training step.

It imports nothing above it: no grpc, protobuf, ray, services or clients (tests/test_architecture.py).
The gRPC scaffold and the CLI are wiring and live under services/.
"""

__version__ = "0.1.0"
