"""Runtime: the key-wise tensor kernels and the randomness they use."""
