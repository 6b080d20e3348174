"""The processes of a scoring run: one, or the ranks of a ``torchrun`` launch.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the group is initialised here
with gloo for a model on the CPU and NCCL for one on a GPU, unless the caller has already
initialised ``torch.distributed``. Only tensors travel between ranks (no pickled objects):
numbers as ``float64`` / ``int64`` tensors and error messages as UTF-8 bytes. Every
collective is reached by every rank, also when one of them fails, so a failure on one rank
becomes an error on all of them instead of a hang.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch

from ..errors import XnnError

T = TypeVar("T")

_MSG_BYTES = 600


class Group:
    """The ranks of this run (a single process when not launched with ``torchrun``).

    Parameters
    ----------
    device : torch.device
        The model's device: NCCL needs the tensors on the GPU, gloo on the CPU.

    Attributes
    ----------
    rank, world : int
        This process's rank and the number of processes.
    backend : str or None
        ``"gloo"``, ``"nccl"`` or ``None`` for a single process.
    """

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._own = False
        self.backend: str | None = None
        self.rank, self.world = 0, 1
        if not dist.is_available():
            return
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if backend == "nccl" and device.index is not None:
                torch.cuda.set_device(device)
            dist.init_process_group(backend)
            self._own = True
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.backend = str(dist.get_backend())
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.backend == "nccl":
            self._dev = (
                device
                if device.type == "cuda"
                else torch.device("cuda", torch.cuda.current_device())
            )
        else:
            self._dev = torch.device("cpu")

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world > 1

    def close(self) -> None:
        """Tear down the process group if this object started it."""
        if self._own and self._dist.is_initialized():
            self._dist.destroy_process_group()
            self._own = False

    # ------------------------------------------------------------------ collectives

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a tensor of the same shape and dtype (on the CPU)."""
        if not self.active:
            return [t]
        src = t.to(self._dev).contiguous()
        out = [torch.empty_like(src) for _ in range(self.world)]
        self._dist.all_gather(out, src)
        return [o.cpu() for o in out]

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (same shape and dtype on all ranks)."""
        if not self.active or t.numel() == 0:
            return t
        buf = t.to(self._dev).contiguous().clone()
        self._dist.broadcast(buf, 0)
        return buf.cpu()

    def broadcast_matrix(self, mat: torch.Tensor | None, ncols: int) -> torch.Tensor:
        """Rank 0's ``R x ncols`` float64 matrix on every rank (``R`` known only to rank 0)."""
        if not self.active:
            assert mat is not None
            return mat
        rows = torch.tensor([0 if mat is None else mat.shape[0]], dtype=torch.long)
        rows = int(self.broadcast(rows)[0])
        buf = mat if self.rank == 0 and mat is not None else torch.zeros(rows, ncols)
        return self.broadcast(buf.double())

    def gather_results(
        self, mat: torch.Tensor | None, error: BaseException | None, ncols: int
    ) -> list[torch.Tensor | None]:
        """Each rank's ``R_r x ncols`` result (or ``None``), raising if any rank failed.

        Parameters
        ----------
        mat : Tensor or None
            This rank's float64 result, ``None`` when it had no work.
        error : exception or None
            What this rank's work raised.
        ncols : int

        Returns
        -------
        list
            One entry per rank.

        Raises
        ------
        BaseException
            This rank's own error; or :class:`XnnError` naming the rank that failed.
        """
        failed = error is not None
        rows = -1 if failed else (0 if mat is None else int(mat.shape[0]))
        head = self.all_gather(torch.tensor([int(failed), rows], dtype=torch.long))
        bad = [r for r, h in enumerate(head) if int(h[0])]
        if bad:
            msgs = self.all_gather(_encode(error))
            if error is not None:
                raise error
            raise XnnError(f"rank {bad[0]} failed: {_decode(msgs[bad[0]])}")
        if not self.active:
            return [mat]
        most = max(int(h[1]) for h in head)
        pad = torch.zeros(most, ncols, dtype=torch.float64)
        if mat is not None and mat.shape[0]:
            pad[: mat.shape[0]] = mat
        parts = self.all_gather(pad)
        return [None if int(h[1]) == 0 else p[: int(h[1])] for h, p in zip(head, parts)]

    def on_rank0(self, fn: Callable[[], T], what: str) -> T | None:
        """Run ``fn`` on rank 0 only; every rank raises if it failed.

        Returns
        -------
        object or None
            ``fn()`` on rank 0, ``None`` on the other ranks.
        """
        out, error = None, None
        if self.rank == 0:
            try:
                out = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
        if not self.active:
            if error is not None:
                raise error
            return out
        status = self.broadcast(torch.tensor([int(error is not None)], dtype=torch.long))
        if int(status[0]):
            msg = _decode(self.broadcast(_encode(error)))
            if error is not None:
                raise error
            raise XnnError(f"rank 0 failed to {what}: {msg}")
        return out


def _encode(error: BaseException | None) -> torch.Tensor:
    raw = (f"{type(error).__name__}: {error}" if error is not None else "").encode()[:_MSG_BYTES]
    buf = torch.zeros(_MSG_BYTES, dtype=torch.uint8)
    if raw:
        buf[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return buf


def _decode(buf: torch.Tensor) -> str:
    data = bytes(buf.tolist()).rstrip(b"\0")
    return data.decode(errors="replace")
