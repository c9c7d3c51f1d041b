"""What a solved table becomes on disk: the merged weights (written out of core),
the replay config, the model card, the figures and the run's report."""
