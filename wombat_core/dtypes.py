"""The one table of floating-point dtypes the suite computes and stores in, by the names users write.

The CLI, the services' proto conversions (`wombat.common.v1.Dtype` values are these names upper-cased
with a `DTYPE_` prefix), model loading and manifests all translate through here.
"""

from __future__ import annotations

import torch

from wombat_core.errors import InvalidArgument

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,  # the reference's arithmetic for deltas; Wombat's release dtype
    "bfloat16": torch.bfloat16,  # what Wombat was trained in
    "float32": torch.float32,
}
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_from_name(name: str, field: str = "dtype") -> torch.dtype:
    """The torch dtype called `name`; InvalidArgument naming `field` and the choices otherwise."""
    if name not in DTYPES:
        raise InvalidArgument(
            f"{field} must be one of {', '.join(DTYPES)}, got {name!r}", metadata={"field": field}
        )
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in NAMES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    return NAMES[dtype]
