"""Checkpoint I/O without torch: header reading for planning, and the streaming output writer.

Tensor data is read by the runtime (mmap, under runtime/); this package only ever looks at
headers, hashes raw bytes, and writes bytes it is handed.
"""

from karmixlang.io.dtypes import DTYPES, USER_DTYPE_NAMES, DType, nbytes, parse_user_dtype
from karmixlang.io.header import CheckpointHeader, TensorInfo, hash_data_region, read_checkpoint
from karmixlang.io.writer import (
    CheckpointWriter,
    OutputFile,
    OutputLayout,
    Slot,
    parse_size,
    plan_output,
)

__all__ = [
    "DTYPES", "USER_DTYPE_NAMES", "DType", "nbytes", "parse_user_dtype",
    "CheckpointHeader", "TensorInfo", "hash_data_region", "read_checkpoint",
    "CheckpointWriter", "OutputFile", "OutputLayout", "Slot", "parse_size", "plan_output",
]
