"""The oracle's model untied where the pool unties its head (:mod:`mergekit_fw.pool.tied`).

The merged model then stores ``lm_head.weight`` apart from the input embeddings, so
the calibration loss must be taken with the two as separate parameters: one
coefficient table column each, one gradient each."""

from __future__ import annotations

from typing import Any

from torch import nn


def untie_head(model: Any) -> None:
    """Give the output head a parameter of its own, a copy of the input embeddings.
    ``model``: a transformers causal LM (its output and input embeddings are found by
    its own accessors)."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None:
        raise ValueError(f"{type(model).__name__}: the pool unties its output head, but the model has none to untie")
    if head.weight is embeddings.weight:
        if head.weight.device.type == "meta":
            raise ValueError(
                "the pool unties lm_head from the input embeddings, and the oracle's device_map offloads them; "
                "give the oracle more memory"
            )
        head.weight = nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
