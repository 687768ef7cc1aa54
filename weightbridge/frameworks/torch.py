"""PyTorch adapter: specs from modules and state dicts (meta tensors too), arrays back to tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from weightbridge.errors import SpecError
from weightbridge.spec import CheckpointSpec, TensorSpec

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def state_dict_of(obj: Any) -> dict[str, Any]:
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, dict):
        return dict(obj)
    raise SpecError(f"expected a torch.nn.Module or a state dict, found {type(obj).__name__}")


def spec_from_torch(obj: Any) -> CheckpointSpec:
    """Specs of a module's state dict (or a state dict); works on the meta device, no data read.

    >>> spec_from_torch(torch.nn.Linear(3, 2, device="meta")).names
    ['weight', 'bias']
    """
    tensors = []
    for name, t in state_dict_of(obj).items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.dtype not in _DTYPES:
            raise SpecError(f"tensor {name!r}: torch dtype {t.dtype} is not supported")
        tensors.append(TensorSpec(name, tuple(t.shape), _DTYPES[t.dtype]))
    return CheckpointSpec.of(tensors)


def memory_key(t: Any) -> tuple[Any, ...] | None:
    """Equal for two tensors exactly when they are the same elements of the same memory.

    Storage, offset, shape, stride and dtype must all agree: a slice or a transposed view of
    a tensor is not an alias of it. Meta and empty tensors have no memory and no key.

    >>> w = torch.zeros(3, 2)
    >>> memory_key(w) == memory_key(w.detach()), memory_key(w) == memory_key(w.t())
    (True, False)
    """
    if t.device.type == "meta" or t.numel() == 0 or t.layout != torch.strided:
        return None
    return (
        str(t.device),
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def tied_names(module: Any) -> list[list[str]]:
    """State-dict names that hold the same parameter or buffer object (tied weights).

    Found by identity, so it works on the meta device too, where tensors have no memory.

    >>> m = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
    >>> m["b"].weight = m["a"].weight
    >>> tied_names(m)
    [['a.weight', 'b.weight']]
    """
    names = set(module.state_dict(keep_vars=True))
    groups: dict[int, list[str]] = {}
    for name, t in [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]:
        if name in names and t is not None:
            groups.setdefault(id(t), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def to_numpy(t: Any) -> np.ndarray:
    """A CPU numpy array of a tensor; bf16 goes through a same-size integer view (no rounding)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        out: np.ndarray = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return out
    fp8 = str(t.dtype).removeprefix("torch.")
    if fp8.startswith("float8_"):  # numpy has no fp8; ml_dtypes names them as torch does
        import ml_dtypes

        if hasattr(ml_dtypes, fp8):
            bits: np.ndarray = t.contiguous().view(torch.uint8).numpy()
            return bits.view(getattr(ml_dtypes, fp8))
    plain: np.ndarray = t.numpy()
    return plain


def from_numpy(a: np.ndarray, like: Any) -> Any:
    """A tensor with `like`'s dtype and device holding `a`'s values."""
    if a.dtype.name == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    device = like.device if like.device.type != "meta" else "cpu"
    return t.to(device=device, dtype=like.dtype)
