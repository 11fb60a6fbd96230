"""The I/O floor of a merge: read every input tensor region once, write the output once.

    python bench/floor.py --out OUT --size BYTES INPUT.safetensors...

Reads each file's data region (after the JSON header) in 64 MiB positional reads into one
reused buffer, then writes BYTES bytes to OUT in 64 MiB writes and fsyncs it. No tool can
merge these inputs into an output of that size with less I/O; run from a warm page cache it
is a memory-bandwidth floor, from a cold one a disk floor.
"""

import argparse
import os
import struct

CHUNK = 64 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, required=True, help="bytes to write")
    ap.add_argument("inputs", nargs="+")
    a = ap.parse_args()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    for path in a.inputs:
        fd = os.open(path, os.O_RDONLY)
        try:
            (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            offset, end = 8 + header_len, os.fstat(fd).st_size
            while offset < end:
                n = os.preadv(fd, [view[:min(CHUNK, end - offset)]], offset)
                if n <= 0:
                    raise OSError(f"{path}: short read at {offset}")
                offset += n
                total += n
        finally:
            os.close(fd)
    # Output bytes that are not all zeros (a file system could special-case those).
    buf[:] = os.urandom(1 << 20) * (CHUNK >> 20)
    fd = os.open(a.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = a.size
        while left:
            left -= os.write(fd, view[:min(CHUNK, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"read {total} bytes, wrote {a.size} bytes")


if __name__ == "__main__":
    main()
