"""Learning: the Ray Train job (`train`), its loop (`fit`) and frozen-base feature cache
(`features`), evaluation on the shards (`evaluate`) and building an evaluated ensemble
(`ensemble`). Independent of `detector.scanning`."""
