"""`detector promote`: move a model name's `latest` to a version only when the gate passes.

The gate is `detector.training.compare` between the version `latest` names now and the
candidate, on shards (the candidate card's training data unless given). A forced
promotion moves the pointer anyway and says so in it: the pointer records the previous
version, when, whether it was forced and the gate's verdict and regressions. A running
Serve app keeps the version it pinned at start until it is rebuilt.
"""

from __future__ import annotations

import datetime as dt

from detector.model.artifact import load_card, name_of, point, resolve
from detector.training.compare import TOLERANCE, compare


def promote(version_uri: str, shards_uri: str | None = None, force: bool = False,
            tolerance: float = TOLERANCE, backend: str = "auto") -> dict:
    """{promoted, name, previous, candidate, forced, gate}: the comparison record as
    `gate`, and whether `latest` now names the candidate."""
    version_uri = version_uri.rstrip("/")
    name = name_of(version_uri)
    if name is None:
        raise ValueError(f"{version_uri} is not a version under a model name (OUT/<name>/<id> "
                         "beside OUT/<name>/latest.json)")
    current = resolve(name)
    candidate = load_card(version_uri)
    result = {"name": name, "previous": current.rsplit("/", 1)[-1], "candidate": candidate.id,
              "promoted": False, "forced": False, "gate": None}
    if current == version_uri:
        return {**result, "reason": "already the latest"}
    shards_uri = shards_uri or candidate.config.get("data")
    if not shards_uri and not force:
        raise ValueError(f"{version_uri}: its card names no data to gate on; pass --data "
                         "SHARDS (or --force)")
    gate = compare(current, version_uri, shards_uri, tolerance=tolerance, backend=backend) \
        if shards_uri else None
    passed = gate is not None and gate["passed"]
    result["gate"] = gate
    if not passed and not force:
        return {**result, "reason": "the gate failed"}
    point(name, candidate, promotion={
        "from": result["previous"], "forced": not passed,
        "promoted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gate": None if gate is None else {"passed": passed, "data": shards_uri,
                                           "tolerance": tolerance,
                                           "regressions": gate["regressions"]}})
    return {**result, "promoted": True, "forced": not passed}
