"""The pool: the base and its candidates, from the user's references to checked,
lazily read task vectors.

* :mod:`.references`: model references as written, resolved to local folders;
* :mod:`.safetensors_io`: safetensors headers and tensors read (and written) by offset;
* :mod:`.pickled`: pickled weights refused, or converted once when allowed;
* :mod:`.vocab`: candidates with another vocabulary aligned to the base's by token;
* :mod:`.candidates`: LoRA factors kept resident, dense checkpoints streamed;
* :mod:`.pool`: the opened pool, structurally checked against the base;
* :mod:`.components`: LoRAs split into rank-1 candidates (``granularity: rank_component``);
* :mod:`.validate`: the one numeric pass before any maths (NaN, norms, outliers).

Nothing here knows of calibration, the solver, the output or mergekit.
"""
