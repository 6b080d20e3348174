"""``raise_heap_thresholds``: a batch's activations stay mapped between batches (glibc).

What it guarantees is deterministic: afterwards blocks under 31 MiB come from the heap and
up to 62 MiB of free heap stays mapped, so a batch whose blocks total less than that is not
faulted in again. (Whether a process *without* it faults depends on which blocks it freed
before; ``bench/interop.py --default-malloc`` measures the scoring runner both ways.)
"""

import os
import subprocess
import sys
import textwrap

import pytest

import xnn_toolkit._allocator as alloc

SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from xnn_toolkit._allocator import raise_heap_thresholds

    def batches(n):
        # a forward / backward: three 16 MiB blocks (48 MiB), used and freed
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            a = torch.ones(4 * 2**20)
            b = torch.ones(4 * 2**20)
            c = torch.ones(4 * 2**20)
            del a, b, c
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

    raise_heap_thresholds()
    batches(3)
    print(batches(10))
    """
)

PAGES = 10 * 3 * 16 * 2**20 // 4096  # ten batches' blocks, in 4 KiB pages


def _faults(**env: str) -> int:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        env={**full, **env, "THP_MEM_ALLOC_ENABLE": "0"},
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not alloc._is_glibc(), reason="glibc's malloc thresholds only")
def test_raised_thresholds_keep_a_batch_mapped():
    # the control: with the mmap threshold pinned at 128 KiB (which switches glibc's dynamic
    # thresholds off, so raising them does nothing) every block is mapped and faulted in again
    assert _faults(MALLOC_MMAP_THRESHOLD_="131072") > PAGES / 2
    # raised: the blocks come from the heap, and the heap keeps them mapped
    assert _faults() < PAGES / 10


def test_off_glibc_nothing_happens(monkeypatch):
    assert alloc.PRIME_BYTES < 32 * 2**20  # under glibc's cap, or the thresholds stay
    monkeypatch.setattr(alloc, "_is_glibc", lambda: False)
    assert alloc.raise_heap_thresholds() is False
