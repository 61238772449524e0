"""Reading weight files safely: checksums and strict, ``weights_only`` state-dict loading.

Shared by the registry's loaders (EfficientNet-Lite0, the shipped zoo) and ``srdxai train``,
so every weight file is hashed, read and matched to its architecture the same way, with errors
that name the file and end with what to do (``hint``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from srdxai.errors import SrdxaiError

__all__ = ["first_line", "load_checkpoint", "sha256_file", "verify_sha256"]


def first_line(exc: BaseException) -> str:
    """``"Type: first line of the message"`` (torch's errors run over many lines)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, what: str, hint: str) -> None:
    """Raise a clear :class:`SrdxaiError` unless ``path`` exists and has the sha256 ``expected``."""
    if not path.is_file():
        raise SrdxaiError(f"the weight file for {what} is missing: {path}; {hint}")
    actual = sha256_file(path)
    if actual != expected:
        raise SrdxaiError(
            f"the weight file for {what} ({path}) fails its checksum (sha256 {actual[:16]}..., "
            f"expected {expected[:16]}...): it is corrupt or not the file its card describes; "
            f"{hint}")


def load_checkpoint(model: torch.nn.Module, path: Path, what: str, hint: str
                    ) -> torch.nn.Module:
    """Load a state-dict file into ``model`` (strict, ``weights_only=True``); eval mode."""
    if not path.is_file():
        raise SrdxaiError(f"the weight file for {what} is missing: {path}; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise SrdxaiError(f"cannot read the weight file for {what} ({path}): {first_line(exc)}; "
                          f"the file is probably corrupt; {hint}") from exc
    state = _unwrapped(state)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise SrdxaiError(f"the weight file for {what} ({path}) does not hold a state dict of "
                          f"tensors; {hint}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SrdxaiError(f"the weight file for {what} ({path}) does not match its "
                          f"architecture ({first_line(exc)}); {hint}") from exc
    return model.eval()


#: keys under which training scripts commonly store the state dict in a checkpoint
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema")


def _unwrapped(state: object) -> object:
    """The state dict inside a training checkpoint (``{"state_dict": ...}``, ``{"model": ...}``),
    with the ``module.`` prefix of ``DataParallel`` / DDP checkpoints removed."""
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        for key in _STATE_KEYS:
            inner = state.get(key)
            if isinstance(inner, Mapping) and inner and all(
                    isinstance(v, torch.Tensor) for v in inner.values()):
                state = inner
                break
    if isinstance(state, Mapping) and state and all(
            isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
