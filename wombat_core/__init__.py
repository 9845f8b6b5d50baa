"""Wombat core library: weights, deltas, tokenizer and prompts, and the shared gRPC server scaffold.

Domain modules here import no grpc, protobuf or ray; only `wombat_core.server` (the scaffold) and
`wombat_core.cli` touch transport.
"""

__version__ = "0.1.0"
