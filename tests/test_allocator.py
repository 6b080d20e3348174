"""``raise_heap_thresholds``: a CPU scoring run reuses its activations' memory (glibc)."""

import subprocess
import sys
import textwrap

import pytest

import xnn_toolkit._allocator as alloc

SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    import xnn_toolkit.report.scoring as scoring
    from xnn_toolkit.data.normalized import Normalized
    from xnn_toolkit.data.synthetic import SyntheticParts
    from xnn_toolkit.models import load_model
    from xnn_toolkit.report.scoring import ScoringConfig, score_dataset

    if sys.argv[1] == "off":
        scoring.raise_heap_thresholds = lambda: False
    torch.set_num_threads(1)
    lm = load_model("bundled:vgg_synth")
    pre = lm.preprocessing
    raw = SyntheticParts(64, size=64, seed=0, num_classes=10, return_annotations=True)
    ds = Normalized(raw, pre.mean, pre.std)
    cfg = ScoringConfig(methods=("cmwp",), metrics=("pointing_game",), batch_size=16)
    score_dataset(lm.model, ds, cfg, progress=False)
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    score_dataset(lm.model, ds, cfg, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    """
)


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not alloc._is_glibc(), reason="glibc's malloc thresholds only")
def test_a_scoring_run_does_not_fault_its_activations_in_again():
    # 4 batches of 16 images at 64 x 64: the first layer's activations alone are 8 MiB
    batch = 16 * 32 * 64 * 64 * 4 // 4096  # pages of one such block
    # glibc's default dynamic thresholds: the heap's top is given back after each batch
    # and faulted in again in the next (the mapped-block history of a fresh process)
    off = _faults("off")
    on = _faults("on")
    assert off >= 4 * batch, off
    # raised once per run: the blocks stay mapped
    assert on < off / 4, (on, off)


def test_off_glibc_nothing_happens(monkeypatch):
    assert alloc.PRIME_BYTES < 32 * 2**20  # under glibc's cap, or the thresholds stay
    monkeypatch.setattr(alloc, "_is_glibc", lambda: False)
    assert alloc.raise_heap_thresholds() is False
