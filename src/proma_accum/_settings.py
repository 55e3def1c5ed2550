"""Validation of ``ProjectedAccumulator``'s settings: each bad value gets an error naming it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

from torch import nn

from ._proma import SPAN_COEFFICIENTS, Projection

# Per-sequence gradients of one tensor, (k + 1) x its size, are formed whole (and, for Linear and
# Conv1D, in place of the weight-gradient GEMM) up to this size; larger ones go chunk by chunk.
DEFAULT_CHUNK_BYTES = 2**30


class Settings(NamedTuple):
    projection: Projection
    clamp: float | None
    strength: float
    exclude: tuple[str, ...]
    chunk_bytes: int
    compile: bool


def validate(
    model: object,
    projection: object,
    clamp: object,
    strength: object,
    optimizer: object,
    exclude: object,
    chunk_bytes: object,
    compile: object = False,
) -> Settings:
    """The settings, checked and normalised; raises ``TypeError``/``ValueError`` naming the
    argument otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if projection not in SPAN_COEFFICIENTS:
        raise ValueError(
            f"projection must be one of {sorted(SPAN_COEFFICIENTS)}, got {projection!r}"
        )
    if clamp is not None and (
        isinstance(clamp, bool)
        or not isinstance(clamp, (int, float))
        or not math.isfinite(clamp)
        or clamp <= 0
    ):
        raise ValueError(f"clamp must be a finite number > 0 or None, got {clamp!r}")
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not 0.0 <= strength <= 1.0
    ):
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if optimizer is not None and not hasattr(optimizer, "param_groups"):
        raise TypeError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = tuple(exclude) if isinstance(exclude, Iterable) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            "exclude must be a string or an iterable of strings (fnmatch patterns of parameter "
            f"names), got {exclude!r}"
        )
    return Settings(
        projection,  # type: ignore[arg-type]
        None if clamp is None else float(clamp),
        float(strength),
        patterns,
        chunk_bytes,
        compile,
    )
