"""The one builder of synthetic LoRA pools: tasks, base, adapters and data whose
relevance we control, deterministic for a seed and cached on disk.

Sizes: ``small`` (the test suite's trained pool), ``example`` (the bundled
example), ``quick`` and ``full`` (the evidence in ``evals/``).

* :mod:`testbed.tasks`: the catalogue of 25 symbol skills in five families;
* :mod:`testbed.data`: train / calibration / held-out JSONL per task and lm-eval task YAMLs;
* :mod:`testbed.build`: the base, the LoRA, noisy and full members, the MTL baseline;
* :mod:`testbed.asked`: a pool set up for some asked tasks (calibration file, fw.yml, ta.yml);
* :mod:`testbed.sanity`: does a pool measure something (the relevant adapters merge)?

Not part of the installed library (the wheel ships ``mergekit_fw`` only): a user
merging hub LoRAs never needs a toy pool, and what the tests, the example and the
evidence measure stays out of the API users depend on. It imports ``mergekit_fw``
(to merge for the sanity check), never the other way round.
"""
