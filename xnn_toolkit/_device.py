"""Turn a user's device argument into a ``torch.device`` that exists, or a clear error."""

from __future__ import annotations

import torch

from .errors import InputError

__all__ = ["model_device", "resolve_device"]


def resolve_device(device: object, arg: str = "device") -> torch.device:
    """Parse ``device`` and check that this machine has it.

    Parameters
    ----------
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ...
    arg : str
        How the message names the argument (``"--device"`` in the CLI).

    Returns
    -------
    torch.device

    Raises
    ------
    InputError
        Not a device name, or a device this machine lacks (the message says what it has).
    """
    have = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        have.append("mps")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError):
        raise InputError(
            f"{arg} {device!r} is not a torch device; use one of: {', '.join(have)}"
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise InputError(
                f"{arg} {device!r}: this machine has no CUDA device (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu"
                if arg.startswith("--")
                else f"{arg} {device!r}: this machine has no CUDA device; use 'cpu'"
            )
        if dev.index is not None and dev.index >= n:
            raise InputError(
                f"{arg} {device!r}: only {n} CUDA device(s); use one of: {', '.join(have)}"
            )
    elif dev.type == "mps" and "mps" not in have:
        raise InputError(
            f"{arg} {device!r}: MPS is not available here; use one of: {', '.join(have)}"
        )
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise InputError(f"{arg} {device!r} is not supported; use one of: {', '.join(have)}")
    return dev


def model_device(model: torch.nn.Module, device: object = None) -> torch.device:
    """Where ``model`` lives: its first parameter's device, else its first buffer's.

    A model with neither lives where ``device`` says (CPU by default). With ``device`` given,
    a model on another kind of device is an error: the toolkit never moves the user's model.

    Raises
    ------
    InputError
        ``device`` names another device type than the model's.
    """
    here = next((t.device for t in model.parameters()), None)
    if here is None:
        here = next((t.device for t in model.buffers()), None)
    if here is None:
        return torch.device(device) if device is not None else torch.device("cpu")
    if device is not None and torch.device(device).type != here.type:
        raise InputError(
            f"the model is on {here} but device={device!r}; move the model with "
            f"model.to({str(device)!r}) first (fitting never moves the user's model)"
        )
    return here
