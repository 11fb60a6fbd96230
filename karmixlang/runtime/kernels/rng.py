"""Counter-based randomness for DARE and DELLA (methods.md, "Randomness").

Every (seed, key, member) triple names one stream of uniforms; element i of a tensor (its
row-major flat index) always gets the i-th uniform of its stream, so a mask never depends on
threads, key order, the other keys, or how a key is split into chunks.

The scheme, exactly, so that another implementation can reproduce the masks:

1. Stream key. With ``le64(v)`` the 8-byte little-endian encoding of ``v mod 2**64``::

       msg = b"karmixlang-rng-v1\\0" + le64(seed) + le64(member)
             + le64(len(name)) + name            # name = the tensor key, UTF-8 bytes
       h = blake2b(msg, digest_size=16)           # hashlib.blake2b, no key/salt/person
       k0 = int.from_bytes(h[0:8], "little");  k1 = int.from_bytes(h[8:16], "little")

   ``seed`` must lie in [-2**63, 2**64) (so -1 and 2**64 - 1 name the same stream) and
   ``member`` in [0, 2**64).
2. Generator. Philox4x64-10 (Salmon et al., SC 2011, as in Random123 and
   numpy.random.Philox: 10 rounds, multipliers 0xD2E7470EE14C6C93 and 0xCA5A826395121157,
   key increments 0x9E3779B97F4A7C15 and 0xBB67AE8584CAA73B) with key (k0, k1). Block j is
   Philox4x64-10 of the 256-bit counter j (words ctr[0] = j mod 2**64, ctr[1] = j >> 64,
   ...); its 4 output words are elements 4j, 4j+1, 4j+2, 4j+3 of the stream.
3. Uniform. Output word x becomes ``(x >> 11) * 2**-53``, a float64 in [0, 1).

DARE and DELLA keep element i when ``u_i < q_i`` (q = keep probability), so q = 0 never keeps
and q = 1 always keeps.
"""

from __future__ import annotations

import hashlib
import operator

import numpy as np

__all__ = ["stream_key", "uniform"]

_DOMAIN = b"karmixlang-rng-v1\0"
_U64 = 1 << 64


def _le64(value: int) -> bytes:
    return (value % _U64).to_bytes(8, "little")


def stream_key(seed: int, key: str, member: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of the (seed, key, member) stream (step 1 of the scheme)."""
    seed = operator.index(seed)
    member = operator.index(member)
    if not -(1 << 63) <= seed < _U64:
        raise ValueError(f"seed {seed} is outside [-2**63, 2**64)")
    if not 0 <= member < _U64:
        raise ValueError(f"member index {member} is outside [0, 2**64)")
    name = key.encode("utf-8")
    msg = _DOMAIN + _le64(seed) + _le64(member) + _le64(len(name)) + name
    digest = hashlib.blake2b(msg, digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def uniform(seed: int, key: str, member: int, n: int, offset: int = 0) -> np.ndarray:
    """Uniforms in [0, 1) (float64) for flat elements [offset, offset + n) of the stream."""
    if n < 0 or offset < 0:
        raise ValueError("n and offset must be non-negative")
    if n == 0:
        return np.empty(0, dtype=np.float64)
    k0, k1 = stream_key(seed, key, member)
    first_block, skip = divmod(offset, 4)
    # numpy's Philox increments its counter *before* it generates a block, so start one
    # below the first block we want (all-ones wraps around to block 0).
    start = (first_block - 1) % (1 << 256)
    counter = np.array([(start >> (64 * w)) & (_U64 - 1) for w in range(4)], dtype=np.uint64)
    bitgen = np.random.Philox(key=np.array([k0, k1], dtype=np.uint64), counter=counter)
    # Generator.random draws exactly (next_uint64 >> 11) * 2**-53 (step 3), without the
    # temporaries that doing the conversion here would cost.
    gen = np.random.Generator(bitgen)
    gen.random(skip)
    return gen.random(n)
