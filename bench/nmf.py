"""Post-hoc NMF: time to scikit-learn's ``cd`` error, peers side by side, and online memory.

Two measurements, random weights, no network:

1. **Speed.** ``X`` = post-ReLU activations of the last conv layer of a small random-init CNN
   on random 64 px images: ``C = 512`` channels x ``N·H·W = 50 176`` positions (``--quick``:
   128 x 2 048). For each rank (8 and 32), in the same run and in rotating order per
   repetition:

   - scikit-learn ``NMF(solver="cd", init="nndsvda", tol=1e-4, max_iter=200)`` on ``Xᵀ``
     (float32). Its error ``e_cd = ||X − MS||_F`` (computed in float64 from its factors: the
     estimators' own float32 figures are ~1e-4 off on matrices this size) is the target.
   - ours: NNDSVDa + HALS with extrapolation (the code path of ``NMFConcepts.fit``), stopped
     as soon as the tracked objective reaches ``e_cd``: the *time to reach e_cd*, init
     included. Also our default estimator (``NMFConcepts(rank).fit``, ``tol=1e-4``).
   - scikit-learn ``mu`` and the ``overcomplete`` package's torch NMF (HALS, its defaults)
     at their own stopping rules: time and error, and whether they reach ``e_cd``.

   Headline: ``median(sklearn cd time) / median(our time to e_cd)`` (target ≥ 3 on CPU).
   Peers (``mu``, overcomplete) are slower and run ``--peer-reps`` times (default 1).

2. **Online memory.** A memory-mapped ``.npy`` bank of activations ``N x C x H x W`` 4 x
   larger than a memory budget is written to ``bench/out/``; a fresh subprocess fits
   ``NMFConcepts(online=True)`` on it, reading batches with ``os.preadv`` (so the page cache
   is not charged to the process), and reports its peak RSS (``VmHWM``) above the RSS just
   before the fit, with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``, so freed
   batches are returned) and with glibc's default (freed batches cached in the heap). As the
   reference, another subprocess loads the bank and fits in memory.

All methods get the same number of threads (``--threads``, default 1, for torch and for numpy's
BLAS through threadpoolctl). Run ``.venv/bin/python bench/nmf.py`` (several minutes on 2 busy
cores) or ``--quick`` (seconds). Ends with ``RESULT <name> <value> <unit>`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"


# --------------------------------------------------------------------------- data


def _cnn(c_out: int):
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(128, c_out, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.ReLU(),
    ).eval()


def _activations(n_img: int, size: int, channels: int, seed: int = 0):
    """Post-ReLU activations ``n_img x channels x size/4 x size/4`` of a random CNN."""
    import torch

    torch.manual_seed(seed)
    net = _cnn(channels)
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    with torch.no_grad():
        for i in range(0, n_img, 32):
            out.append(net(torch.rand(min(32, n_img - i), 3, size, size, generator=g)))
    return torch.cat(out)


def _exact_err(X, M, S, chunk: int = 8192) -> float:
    """``||X − M S||_F`` accumulated in float64 (``X``: C x P, ``M``: C x r, ``S``: r x P)."""
    total = 0.0
    Md = M.double()
    for j in range(0, X.shape[1], chunk):
        R = X[:, j : j + chunk].double() - Md @ S[:, j : j + chunk].double()
        total += float((R * R).sum())
    return total**0.5


# --------------------------------------------------------------------------- speed


def _speed(quick: bool, ranks: list[int], reps: int, peer_reps: int) -> dict[str, float]:
    import matplotlib
    import torch
    from sklearn.decomposition import NMF as SkNMF

    matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap  # overcomplete needs it (mpl>=3.9)
    from overcomplete.optimization import NMF as OcNMF

    from xnn_toolkit.heads import NMFConcepts
    from xnn_toolkit.heads import _nmf_solvers as solvers

    n_img, size, channels = (32, 32, 128) if quick else (196, 64, 512)
    a = _activations(n_img, size, channels)
    X = a.permute(1, 0, 2, 3).reshape(channels, -1).contiguous()  # C x P
    XT = X.T.numpy()  # P x C, scikit-learn's samples x features (a view, float32)
    xnorm = _exact_err(X, torch.zeros(X.shape[0], 1), torch.zeros(1, X.shape[1]))
    print(
        f"X: {tuple(X.shape)} float32, {float((X == 0).float().mean()):.0%} zeros, "
        f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
    )
    results: dict[str, float] = {}

    for r in ranks:
        times: dict[str, list[float]] = {}
        errs: dict[str, float] = {}
        iters: dict[str, int] = {}

        def sk(solver: str, r=r) -> tuple[float, float, int]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter
                t0 = time.perf_counter()
                est = SkNMF(
                    r, solver=solver, init="nndsvda", random_state=0, tol=1e-4, max_iter=200
                )
                W = est.fit_transform(XT)
                dt = time.perf_counter() - t0
            M = torch.from_numpy(est.components_.T.copy())
            return dt, _exact_err(X, M, torch.from_numpy(W.T.copy())), est.n_iter_

        def overcomplete(r=r) -> tuple[float, float, int]:
            t0 = time.perf_counter()
            oc = OcNMF(nb_concepts=r, solver="hals", tol=1e-4)
            Z, D = oc.fit(X.T.contiguous(), max_iter=500)
            dt = time.perf_counter() - t0
            return dt, _exact_err(X, D.T.float(), Z.T.float()), -1

        def ours_to_target(target: float, r=r) -> tuple[float, float, int]:
            t0 = time.perf_counter()
            M0, S0 = solvers.nndsvd_init(X, r, generator=torch.Generator().manual_seed(0))
            res = solvers.fit_full(
                X, M0, S0, max_iter=2000, tol=0.0, stop=lambda it, e: e <= target
            )
            dt = time.perf_counter() - t0
            return dt, _exact_err(X, res.M, res.S), res.n_iter

        def ours_default(r=r) -> tuple[float, float, int]:
            t0 = time.perf_counter()
            est = NMFConcepts(r).fit(X.T)
            dt = time.perf_counter() - t0
            return dt, est.reconstruction_err_, est.n_iter_

        # The target comes from a first scikit-learn cd run (it is deterministic).
        dt, target, it = sk("cd")
        times["sklearn_cd"], errs["sklearn_cd"], iters["sklearn_cd"] = [dt], target, it
        for rep in range(reps):
            jobs = [
                ("ours_to_cd_err", lambda target=target: ours_to_target(target)),
                ("sklearn_cd", lambda: sk("cd")),
                ("ours_default", ours_default),
            ]
            if rep < peer_reps:
                jobs += [("sklearn_mu", lambda: sk("mu")), ("overcomplete", overcomplete)]
            k = rep % len(jobs)
            for name, fn in jobs[k:] + jobs[:k]:
                if name == "sklearn_cd" and rep == 0:
                    continue  # already ran once for the target
                dt, err, it = fn()
                times.setdefault(name, []).append(dt)
                errs[name], iters[name] = err, it
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nrank {r}: target e_cd = {target:.6f} (relative {target / xnorm:.6f})")
        print(
            f"  {'method':16s} {'median s':>9s} {'runs':>4s} {'rel. error':>11s} "
            f"{'iters':>6s} {'reaches e_cd':>12s}"
        )
        for name in ("ours_to_cd_err", "ours_default", "sklearn_cd", "sklearn_mu", "overcomplete"):
            if name not in med:
                continue
            reach = "yes" if errs[name] <= target * (1 + 1e-7) else "no"
            print(
                f"  {name:16s} {med[name]:9.2f} {len(times[name]):4d} "
                f"{errs[name] / xnorm:11.6f} {iters[name]:6d} {reach:>12s}"
            )
            results[f"nmf_r{r}_{name}_s"] = med[name]
            results[f"nmf_r{r}_{name}_relerr"] = errs[name] / xnorm
        results[f"nmf_r{r}_speedup_vs_sklearn_cd"] = med["sklearn_cd"] / med["ours_to_cd_err"]
        results[f"nmf_r{r}_ours_reaches_cd_err"] = float(errs["ours_to_cd_err"] <= target)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return results


# --------------------------------------------------------------------------- online memory


class _NpyBank:
    """A bank over one ``.npy`` file (``N x C x H x W`` float32), read batch by batch.

    Batches are read with ``os.pread`` into a fresh buffer: the page cache is then not part of
    the process's resident set, so ``VmHWM`` measures what the fit itself holds.
    """

    def __init__(self, path: Path, layer: str = "conv") -> None:
        import numpy as np

        self.path = path
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(f)
            self._offset = f.tell()
        assert not fortran and dtype == np.float32
        self.shape = shape
        self.layers = [layer]
        self.labels = np.full(shape[0], -1)

    def __len__(self) -> int:
        return self.shape[0]

    def activations(self, layer: str):
        raise RuntimeError("the online benchmark must not load the whole bank")

    def iter_batches(self, layer: str, batch_size: int):
        import numpy as np
        import torch

        row = int(np.prod(self.shape[1:])) * 4
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i in range(0, self.shape[0], batch_size):
                n = min(batch_size, self.shape[0] - i)
                arr = np.empty((n, *self.shape[1:]), dtype=np.float32)
                got = os.preadv(fd, [memoryview(arr).cast("B")], self._offset + i * row)
                if got != n * row:
                    raise OSError(f"short read from {self.path}")
                yield torch.from_numpy(arr)
        finally:
            os.close(fd)


def _vm(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # MiB
    return float("nan")


def _child(mode: str, path: str, rank: int, batch: int, max_iter: int) -> None:
    """Run in a fresh process: fit and print peak memory above the pre-fit RSS as JSON."""
    import numpy as np
    import torch

    from xnn_toolkit.heads import NMFConcepts

    bank = _NpyBank(Path(path))
    # warm up torch's kernels so that their one-off allocations are not counted
    NMFConcepts(2, max_iter=2).fit(torch.rand(4, bank.shape[1], 2, 2))
    base = _vm("VmRSS")
    hwm0 = _vm("VmHWM")
    t0 = time.perf_counter()
    if mode == "online":
        est = NMFConcepts(rank, online=True, batch_size=batch, max_iter=max_iter, tol=1e-4)
        est.fit(bank)
    else:
        a = torch.from_numpy(np.load(path))  # the whole bank in memory
        est = NMFConcepts(rank, max_iter=200, tol=1e-4).fit(a)
    dt = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "peak_above_base_mib": _vm("VmHWM") - base,
                "base_mib": base,
                "hwm_before_mib": hwm0,
                "seconds": dt,
                "relative_err": est.relative_err_,
                "n_iter": est.n_iter_,
            }
        )
    )


def _online(quick: bool) -> dict[str, float]:
    import numpy as np

    budget_mib = 16 if quick else 64
    channels, size, rank = (64, 32, 8) if quick else (256, 64, 16)
    hw = size // 4
    per_img = channels * hw * hw * 4
    n_img = int(4 * budget_mib * 2**20 / per_img) + 1  # bank > 4 x budget
    batch = max(1, int(budget_mib * 2**20 / per_img / 16))  # one batch ~ budget / 16
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"nmf_bank_{'quick' if quick else 'full'}.npy"
    if not path.exists() or np.load(path, mmap_mode="r").shape != (n_img, channels, hw, hw):
        import torch

        torch.manual_seed(0)
        net = _cnn(channels)
        tmp = path.with_suffix(".tmp.npy")
        mm = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.float32, shape=(n_img, channels, hw, hw)
        )
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for i in range(0, n_img, 32):
                n = min(32, n_img - i)
                mm[i : i + n] = net(torch.rand(n, 3, size, size, generator=g)).numpy()
        mm.flush()
        del mm
        os.replace(tmp, path)
    bank_mib = path.stat().st_size / 2**20
    print(
        f"\nonline: bank {path.name} {bank_mib:.0f} MiB = {bank_mib / budget_mib:.1f} x the "
        f"{budget_mib} MiB budget; rank {rank}, batches of {batch} images"
    )
    out: dict[str, dict] = {}
    # glibc raises its mmap threshold after the first large free, after which freed batch
    # buffers stay in the heap; a fixed threshold returns them, so VmHWM shows what is live.
    fixed = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    for key, mode, env in (
        ("online", "online", fixed),
        ("online_glibc_default", "online", {}),
        ("inmemory", "inmemory", fixed),
    ):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            str(path),
            str(rank),
            str(batch),
            "3" if quick else "10",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, env={**os.environ, **env}
        )
        if proc.returncode != 0:
            raise SystemExit(f"child {key} failed:\n{proc.stderr[-3000:]}")
        out[key] = o = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"  {key:21s} peak above pre-fit RSS {o['peak_above_base_mib']:7.1f} MiB, "
            f"{o['seconds']:6.1f} s, relative error {o['relative_err']:.5f}, "
            f"{o['n_iter']} {'passes' if mode == 'online' else 'iterations'}"
        )
    return {
        "nmf_online_bank_mib": bank_mib,
        "nmf_online_budget_mib": float(budget_mib),
        "nmf_online_peak_mib": out["online"]["peak_above_base_mib"],
        "nmf_online_within_budget": float(out["online"]["peak_above_base_mib"] <= budget_mib),
        "nmf_online_peak_glibc_default_mib": out["online_glibc_default"]["peak_above_base_mib"],
        "nmf_inmemory_peak_mib": out["inmemory"]["peak_above_base_mib"],
        "nmf_online_relerr": out["online"]["relative_err"],
        "nmf_inmemory_relerr": out["inmemory"]["relative_err"],
        "nmf_online_s": out["online"]["seconds"],
    }


def _unit(name: str) -> str:
    if "speedup" in name:
        return "ratio"
    if "reaches" in name or "within" in name:
        return "bool"
    for suffix, unit in (("_s", "s"), ("_relerr", "relative"), ("_mib", "MiB")):
        if name.endswith(suffix):
            return unit
    return "value"


def _set_threads(n: int) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(limits=n)  # numpy / scikit-learn BLAS and OpenMP


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _set_threads(int(os.environ.get("XNN_BENCH_THREADS", "1")))
        _, _, mode, path, rank, batch, max_iter = sys.argv
        _child(mode, path, int(rank), int(batch), int(max_iter))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small matrices, seconds")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--reps", type=int, default=3, help="repetitions of ours vs sklearn cd")
    ap.add_argument("--peer-reps", type=int, default=1, help="repetitions of mu / overcomplete")
    ap.add_argument("--skip-online", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for torch and numpy's BLAS alike (default 1: on a shared "
        "2-core machine, 2 OpenMP threads per process oversubscribe)",
    )
    args = ap.parse_args()
    os.environ["XNN_BENCH_THREADS"] = str(args.threads)
    _set_threads(args.threads)
    ranks = [r for r in args.ranks if not args.quick or r < 64]
    results = {} if args.skip_speed else _speed(args.quick, ranks, args.reps, args.peer_reps)
    if not args.skip_online:
        results.update(_online(args.quick))
    print()
    for name, value in results.items():
        print(f"RESULT {name} {value:.6g} {_unit(name)}")


if __name__ == "__main__":
    main()
