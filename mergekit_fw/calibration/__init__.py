"""Calibration data, in the order it flows: Hugging Face datasets into a JSONL
(:mod:`.sources`, the ``mergekit-fw calibration`` command), the JSONL's rows checked
(:mod:`.rows`), chat rows rendered by the base's template (:mod:`.chat`), and every
row tokenised into task-tagged batches (:mod:`.batches`).

Nothing is imported here: the command line reads the sources' settings without
loading torch."""
