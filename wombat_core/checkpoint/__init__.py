"""Checkpoint I/O: HF model directories, streaming safetensors, legacy `.bin` read safely."""

from wombat_core.checkpoint.layout import Checkpoint, TensorMeta, WeightFormat
from wombat_core.checkpoint.safetensors_io import SafetensorsFile, StreamingSafetensorsWriter

__all__ = ["Checkpoint", "SafetensorsFile", "StreamingSafetensorsWriter", "TensorMeta", "WeightFormat"]
