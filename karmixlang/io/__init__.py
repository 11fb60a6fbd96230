"""Checkpoint I/O without torch: header reading for planning, and the streaming output writer.

Tensor data is read by the runtime (runtime/tensors.py); this package only ever looks at
headers, hashes raw bytes, and writes bytes it is handed.
"""
