"""The embedded toy data set (`clipkd toyworld`): drawn shapes with captions, written as webdataset shards, CSV files
and a zero-shot set. Deterministic: the same arguments give the same bytes. It imports nothing of the pipeline."""
