"""POST /v1/labels behind the route: check a batch of reviewers' labels, then append it.

A label may name an image by URI only where the app may read: under `scan_allow`, and
existing there (checked with one HEAD per URI, in parallel). A batch is stored whole or
refused whole, with the first reason, so a reviewer never wonders which half landed.
"""

from __future__ import annotations

import concurrent.futures

from detector.config import ServeConfig
from detector.data import labels
from detector.io import storage
from detector.scanning import service as scan_service
from detector.serving import api

DEFAULT_REVIEWER = "api-key"  # one shared key names nobody; a batch may name its reviewer


class Refused(Exception):
    """A batch the app will not store: HTTP status, error code and why."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def store(batch: api.LabelBatch, config: ServeConfig) -> api.LabelsStored:
    """Check every label of `batch`, then append it to `config.labels_uri` as one part."""
    if not config.labels_uri:
        raise Refused(404, "not-found", "labels are not enabled on this app (start it with "
                      "labels_uri)")
    try:
        parsed = [labels.Label.parse(item.model_dump(exclude_none=True))
                  for item in batch.labels]
    except labels.LabelError as err:
        raise Refused(422, "invalid-label", str(err)) from None
    uris = sorted({item.uri for item in parsed if item.uri})
    outside = [uri for uri in uris if not scan_service.allowed(uri, config.scan_allow)]
    if outside:
        raise Refused(403, "forbidden", f"{outside[0]} is outside the scan allow-list")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        missing = [uri for uri, found in zip(uris, pool.map(_exists, uris), strict=True)
                   if not found]
    if missing:
        raise Refused(422, "unknown-uri", f"no object at {missing[0]}"
                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    stored = labels.append(config.labels_uri, parsed, batch.reviewer or DEFAULT_REVIEWER)
    return api.LabelsStored(**stored)


def _exists(uri: str) -> bool:
    try:
        return storage.exists(uri)
    except (OSError, ValueError):  # an unreadable URI is not one the app knows
        return False
