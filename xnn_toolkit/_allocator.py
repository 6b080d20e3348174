"""Keep glibc's heap from handing back and re-faulting the activations' memory on every batch.

glibc's ``malloc`` serves a request above its *mmap threshold* with a fresh ``mmap`` and
gives the top of its heap back to the system (``brk``) once more than the *trim threshold*
(twice the mmap threshold) lies free there. Both thresholds start low (128 KiB) and rise
only when the process frees an ``mmap``-served block: the threshold becomes that block's
size (at most 32 MiB on 64-bit systems). A CNN's forward and backward allocate and free
blocks of several MiB per batch; if nothing larger has been freed before, every batch maps
or grows, touches, and gives back those megabytes again, and each new page costs a page
fault (tens of thousands per run; ``bench/interop.py`` measures it).

:func:`raise_heap_thresholds` allocates and frees one block just under glibc's cap, the
same as any large temporary array does, so the dynamic thresholds rise to it: later blocks
up to that size come from the heap and up to twice that stays mapped at its top between
batches. It does not call ``mallopt`` (which would switch the dynamic thresholds off for
good), changes nothing where the C library is not glibc, and costs one ``mmap`` /
``munmap`` pair (the block is never touched).
"""

from __future__ import annotations

import platform
from functools import cache

import torch

__all__: list[str] = []

#: glibc's largest dynamic mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX:
#: 4 MiB x sizeof(long)); a freed block larger than this leaves the thresholds alone
_GLIBC_CAP = 32 * 2**20
#: the block freed: under the cap with room for the allocator's alignment and header
PRIME_BYTES = _GLIBC_CAP - 2**20


@cache
def _is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def raise_heap_thresholds() -> bool:
    """Raise glibc's dynamic mmap / trim thresholds to :data:`PRIME_BYTES` / twice that.

    Returns
    -------
    bool
        Whether anything was done (``False`` off glibc).
    """
    if not _is_glibc():
        return False
    # torch's CPU allocator calls posix_memalign, which maps a block this large; freeing it
    # is what raises the thresholds
    block = torch.empty(PRIME_BYTES, dtype=torch.uint8)
    del block
    return True
