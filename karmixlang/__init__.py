"""karmixlang: a declarative language and compiler for merging neural-network checkpoints.

The public API is re-exported from `karmixlang.api` lazily, so `import karmixlang` stays cheap
and never loads torch.
"""

__version__ = "0.1.0"
