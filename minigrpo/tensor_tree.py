"""Nested state (dicts, lists, tuples, scalars, tensors, numpy arrays) as safetensors + JSON, never pickle.

A training checkpoint's trainer state (optimizer moments, scheduler, data cursor, RNG states) is a
tree of containers with tensors at some leaves. `torch.save` would pickle it, and unpickling a file
can run any code its author chose. Here the tree is split in two plain formats that only hold data:

    tensors    {path key: tensor}            -> a safetensors file (raw bytes, exact dtypes)
    manifest   the tree with each tensor     -> JSON
               replaced by a reference

Manifest encoding (JSON values stand for themselves where they can):

    None, bool, int, float, str        as JSON (floats round-trip exactly; inf/nan as Infinity/NaN)
    list                               a JSON array
    dict with str keys, none "__..."   a JSON object (order kept)
    any other dict                     {"__dict__": [[key, value], ...]}   keys encoded like values
    tuple                              {"__tuple__": [...]}                 (random.setstate needs tuples)
    torch.Tensor                       {"__tensor__": "optimizer/state/w/exp_avg"}
    numpy.ndarray                      {"__ndarray__": key, "dtype": "uint32", "shape": [624]}
                                       (its bytes stored as a uint8 tensor)

`unflatten(flatten(x))` rebuilds x exactly: the same containers, tuples as tuples, tensors bitwise
with their dtypes and shapes (on the CPU). Anything else in the tree is a TypeError naming its path:
a bug in what the caller tried to store, not a user error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_TAGS = ("__dict__", "__tuple__", "__tensor__", "__ndarray__")
_RESERVED = "__metadata__"  # a safetensors header's own entry, never a tensor's name


class ManifestError(ValueError):
    """A manifest that does not describe a tree (bad tag, unknown tensor key): a corrupt file."""


def flatten(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able manifest, {key: tensor}) of a nested state; the tensors are the tree's own (no copies)."""
    tensors: dict[str, torch.Tensor] = {}

    def store(t: torch.Tensor, path: tuple[str, ...]) -> str:
        key = base = "/".join(path) or "."
        n = len(tensors)
        while key in tensors or key == _RESERVED:  # "a/b" as one key and as a path: keep both apart
            key, n = f"{base}#{n}", n + 1
        tensors[key] = t
        return key

    def encode(node: Any, path: tuple[str, ...]) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, torch.Tensor):
            if node.layout != torch.strided or node.is_meta:
                raise TypeError(f"cannot store a {node.layout} {node.device.type} tensor at {'/'.join(path)!r}")
            return {"__tensor__": store(node.detach(), path)}
        if isinstance(node, np.ndarray):
            if node.dtype.hasobject or node.dtype.names is not None or node.dtype.subdtype is not None:
                raise TypeError(f"cannot store a numpy array of dtype {node.dtype} at {'/'.join(path)!r}")
            raw = torch.from_numpy(np.ascontiguousarray(node).reshape(-1).view(np.uint8).copy())
            return {"__ndarray__": store(raw, path), "dtype": node.dtype.str, "shape": list(node.shape)}
        if isinstance(node, tuple):
            return {"__tuple__": [encode(v, (*path, str(i))) for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [encode(v, (*path, str(i))) for i, v in enumerate(node)]
        if isinstance(node, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in node):
                return {k: encode(v, (*path, k)) for k, v in node.items()}
            return {"__dict__": [[encode(k, path), encode(v, (*path, str(k)))] for k, v in node.items()]}
        raise TypeError(
            f"cannot store {type(node).__name__} at {'/'.join(path)!r}: only dicts, lists, tuples, tensors, "
            "numpy arrays, str, int, float, bool and None"
        )

    return encode(tree, ()), tensors


def unflatten(manifest: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The tree `flatten` was given, rebuilt from its manifest and tensors (ManifestError if they disagree)."""

    def tensor(key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in tensors:
            raise ManifestError(f"the manifest names tensor {key!r}, which the tensor file does not hold")
        return tensors[key]

    def decode(node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [decode(v) for v in node]
        if not isinstance(node, dict):
            raise ManifestError(f"unexpected JSON value {node!r}")
        tag = next((k for k in node if k.startswith("__")), None)
        if tag is None:
            return {k: decode(v) for k, v in node.items()}
        if tag == "__tensor__":
            return tensor(node[tag])
        if tag == "__ndarray__":
            raw = tensor(node[tag])
            try:
                data = bytearray(raw.numpy().tobytes())  # writable, like the array that was saved
                return np.frombuffer(data, dtype=np.dtype(node["dtype"])).reshape(node["shape"])
            except (KeyError, TypeError, ValueError) as e:
                raise ManifestError(f"bad array entry {node!r}: {e}") from e
        if tag == "__tuple__" and isinstance(node[tag], list):
            return tuple(decode(v) for v in node[tag])
        if tag == "__dict__" and isinstance(node[tag], list):
            if not all(isinstance(kv, list) and len(kv) == 2 for kv in node[tag]):
                raise ManifestError(f"bad dict entry in {node!r}")
            return {_hashable(decode(k)): decode(v) for k, v in node[tag]}
        raise ManifestError(f"unknown manifest entry {node!r}")

    return decode(manifest)


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError as e:
        raise ManifestError(f"dict key {key!r} is not hashable") from e
    return key
