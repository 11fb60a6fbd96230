"""karmixlang: a declarative language and compiler for merging neural-network checkpoints.

    import karmixlang as kmx
    kmx.check("merge.kmx")                   # diagnostics, reads no checkpoint
    compiled = kmx.compile("merge.kmx")      # graph, schedule and plan from headers only
    kmx.run("merge.kmx", threads=2)          # writes the checkpoints (loads torch)
    kmx.format(text)                         # the canonical layout

Attributes are imported on first use, so `import karmixlang` stays cheap and never loads torch.
"""

__version__ = "0.1.0"

_API = {"check": "api", "compile": "api", "run": "api", "format": "api", "parse": "syntax.parser"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'karmixlang' has no attribute {name!r}")
