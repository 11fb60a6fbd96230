"""Stage 7, the only code that imports torch: running an executable schedule key by key
(executor.py, evaluate.py, chunked.py for keys run in chunks), reading tensors (tensors.py),
the kernels of every method (kernels/), the outputs' files and their rules (outputs.py), and
the Ray executor (ray/)."""
