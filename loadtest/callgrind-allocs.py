#!/usr/bin/env python3
"""Heap calls per request in a callgrind profile (loadtest/instructions-per-request).

    callgrind-allocs.py PROFILE REQUESTS

Sums the call counts of every call edge into the allocator's entry points (glibc's malloc,
calloc, realloc, posix_memalign and aligned_alloc, or mimalloc's mi_* ones) from a function
outside the allocator, and the same for free, over the profile's counted requests. Exact
like the instruction count: it does not depend on the machine's load.
"""
import re
import sys

ALLOC = {
    "malloc", "__libc_malloc", "calloc", "__libc_calloc", "realloc", "__libc_realloc",
    "posix_memalign", "__posix_memalign", "aligned_alloc", "memalign", "__libc_memalign",
    "mi_malloc", "mi_zalloc", "mi_calloc", "mi_realloc", "mi_malloc_aligned",
    "mi_zalloc_aligned", "mi_realloc_aligned",
}
FREE = {"free", "__libc_free", "cfree", "mi_free"}


def main() -> None:
    path, requests = sys.argv[1], int(sys.argv[2])
    names: dict[str, str] = {}
    ref = re.compile(r"^(c?fn)=\((\d+)\)(?: (.*))?$")
    caller = ""
    callee = ""
    counts = {"alloc": 0, "free": 0}
    pending = False
    with open(path, errors="replace") as f:
        for line in f:
            m = ref.match(line)
            if m:
                kind, ident, name = m.groups()
                if name is not None:
                    names[ident] = name.strip()
                name = names.get(ident, "")
                if kind == "fn":
                    caller = name
                else:
                    callee = name
                    pending = True
                continue
            if pending and line.startswith("calls="):
                pending = False
                n = int(line.split("=", 1)[1].split()[0])
                inner = caller in ALLOC or caller in FREE or caller.startswith(("_int_", "mi_", "_mi_"))
                if inner:
                    continue
                if callee in ALLOC:
                    counts["alloc"] += n
                elif callee in FREE:
                    counts["free"] += n
    print(f"{counts['alloc'] / requests:.1f} allocations/request, {counts['free'] / requests:.1f} frees/request")


if __name__ == "__main__":
    main()
