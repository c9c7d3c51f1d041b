"""Pickled weights (``.bin``, ``.pt``, ``.pth``): refused, or converted once on request.

Unpickling a community file can run arbitrary code, so a folder whose weights
exist only as pickles is refused unless the user sets ``allow_pickle: true``.
Then the files are loaded with torch's restricted unpickler
(``weights_only=True``) and written once as safetensors into a cache folder keyed
by the originals' paths, sizes and modification times; everything downstream
reads only safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

LOG = logging.getLogger(__name__)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class PickleRefused(ValueError):
    pass


def pickled_weights(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix in PICKLE_SUFFIXES and not p.name.startswith("training_args")
    )


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def pickle_free(folder: Path, what: str, convert_to: Path | None) -> Path:
    """``folder`` itself when it has safetensors weights, else its converted copy under
    ``convert_to`` (None: pickles are refused, the default)."""
    if _has_safetensors(folder):
        return folder
    pickles = pickled_weights(folder)
    if not pickles:
        return folder  # the loaders say what is missing
    if convert_to is None:
        raise PickleRefused(
            f"{what} {pickles[0]}: pickled weights are never loaded by default (unpickling can run code); "
            "convert them to safetensors, or set parameters.allow_pickle: true for files you trust"
        )
    stamp = hashlib.sha256(
        json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in pickles]).encode()
    ).hexdigest()[:24]
    target = Path(convert_to) / stamp
    if (target / ".complete").is_file():
        return target
    tmp = target.with_name(f"{stamp}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for item in folder.iterdir():
        if item.is_file() and item.suffix not in PICKLE_SUFFIXES and not item.name.endswith(".index.json"):
            shutil.copy2(item, tmp / item.name)
    for pickle in pickles:
        LOG.warning("%s: unpickling %s (allow_pickle: true) and converting it to safetensors", what, pickle)
        try:
            state = torch.load(pickle, map_location="cpu", weights_only=True, mmap=False)
        except Exception as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PickleRefused(f"{what} {pickle}: cannot be loaded as plain tensors ({error})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise PickleRefused(f"{what} {pickle}: not a dict of tensors")
        name = pickle.with_suffix(".safetensors").name.replace("pytorch_model", "model")
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in state})
    if len(pickles) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
        )
    (tmp / ".complete").write_text(str(folder))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target
