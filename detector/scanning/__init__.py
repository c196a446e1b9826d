"""Bucket scans: the driver (`scan`), its Ray Data stages (`stages`), partitions of a
listing (`partitions`), the committed Parquet report (`report`) and scans started over
HTTP (`service`). Independent of `detector.training`."""
