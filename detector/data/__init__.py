"""Datasets: synthetic samples (`sample`), preparing a bucket into split Parquet shards
(`prepare`, `shards`), the dataset audit (`audit`), perceptual near-duplicates
(`duplicates`) and the augmentations training and the consistency check share
(`augment`). Uses `detector.io` and `detector.config` only."""
