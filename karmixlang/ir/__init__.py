"""Stages 3 and 4, checked program to graph: lowering evaluates the recipe into interned graph
nodes (lower.py, graph.py), and the optimizer rewrites the graph (optimize.py). What each op
is lives in karmixlang/ops.py."""
