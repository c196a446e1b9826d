"""Provenance evidence read from an image's own bytes, beside the pixel classifier.

    c2pa        a C2PA manifest (c2pa-python): the active manifest's actions and their
                IPTC digital source type, the claim generator, the signature's validation
                state (trust anchors from DETECTOR_C2PA_TRUST_ANCHORS, a PEM bundle)
    xmp         IPTC `Iptc4xmpExt:DigitalSourceType`, `xmp:CreatorTool`
    png-text    generator parameters: A1111 `parameters`, ComfyUI `prompt` / `workflow`
    exif        `Software` naming a known generator, A1111's `UserComment`, camera
                `Make` / `Model`
    metadata    a metadata block Pillow refuses (a text chunk inflating past 1 MB)

Each finding is an `Evidence` (source, kind, strength, detail). Strength `strong` is
decisive (see `detector.verdict`), `weak` and `info` are shown and never decide. Parsing
is bounded: Pillow reads headers only (no pixels) and caps text chunks, XMP goes through
defusedxml, and a malformed manifest or metadata block is an `error` finding, never an
exception.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

STRONG, WEAK, INFO = "strong", "weak", "info"
AI_KINDS = ("ai-source-type", "generator-metadata", "generator-software")
TRUST_ANCHORS_ENV = "DETECTOR_C2PA_TRUST_ANCHORS"
IPTC_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
# IPTC digital source types that say a model made (some of) the image...
AI_SOURCE_TYPES = frozenset({"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia",
                             "algorithmicMedia", "compositeSynthetic"})
# ...and those that say a camera or scanner did. Shown only: anyone can write them.
CAPTURE_SOURCE_TYPES = frozenset({"digitalCapture", "computationalCapture", "negativeFilm",
                                  "positiveFilm", "print", "compositeCapture"})
# Names in Software / CreatorTool that only image generators write.
GENERATORS = re.compile(
    r"\b(midjourney|dall[-·\s]?e|stable[\s-]?diffusion|sdxl|comfyui|automatic1111|novelai|"
    r"invokeai|fooocus|adobe firefly|leonardo\.ai|ideogram|imagen \d|flux\.1)\b", re.I)
DETAIL_CHARS = 200  # evidence details are summaries, never whole prompts or manifests
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Bumped when a rule above changes what is found: a resumed scan then re-reads every row.
RULES_VERSION = 1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evidence:
    source: str  # c2pa | xmp | png-text | exif | metadata
    kind: str  # ai-source-type | capture-source-type | generator-metadata |
    #            generator-software | camera | remote-manifest | error
    strength: str  # strong | weak | info
    detail: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def inspect(blob: bytes) -> list[Evidence]:
    """Every provenance finding in `blob`, strongest first; [] for an ordinary image or
    for bytes that are no image (decoding reports those)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as image:  # headers only: no pixels decoded
            mime = Image.MIME.get(image.format or "", "image/jpeg")
            # A JPEG carries its C2PA manifest in APP11 segments, which Pillow has just
            # listed: without one, the C2PA reader (0.1 ms) need not look.
            c2pa_possible = image.format != "JPEG" or any(
                marker == "APP11" for marker, _ in getattr(image, "applist", []))
            found = list(_metadata(image))
    except ValueError as exc:
        if not blob.startswith(PNG_SIGNATURE):
            return []  # not an image Pillow reads: decoding reports it
        # Pillow's caps on PNG text: a chunk inflating past 1 MB, or too many of them.
        mime, c2pa_possible = "image/png", True
        found = [Evidence("metadata", "error", INFO, _clip(str(exc)))]
    except Exception:  # (unreadable, or a pixel bomb: decoding says so)
        return []
    if c2pa_possible:
        try:
            found += _c2pa(blob, mime)
        except Exception as exc:  # a manifest shaped unlike any spec: never the caller's crash
            log.warning("C2PA evidence failed: %s: %s", type(exc).__name__, exc)
            found.append(Evidence("c2pa", "error", INFO,
                                  _clip(f"unreadable manifest: {type(exc).__name__}")))
    order = {STRONG: 0, WEAK: 1, INFO: 2}
    return sorted(found, key=lambda e: order[e.strength])


def rules_id() -> str:
    """What a finding depends on besides the bytes: the rules and the trust anchors. A
    resumed scan reuses a row's evidence only under the same id."""
    anchors = os.environ.get(TRUST_ANCHORS_ENV, "")
    suffix = f"+anchors:{hashlib.sha1(anchors.encode()).hexdigest()[:8]}" if anchors else ""
    return f"{RULES_VERSION}{suffix}"


def decisive(evidence: Iterable[Evidence]) -> Evidence | None:
    """The finding that decides a verdict on its own: strong evidence of AI generation."""
    return next((e for e in evidence if e.strength == STRONG and e.kind in AI_KINDS), None)


# ------------------------------------------------------------------------------ C2PA


def check_settings() -> None:
    """Read the C2PA settings now (trust anchors included): the processes that will read
    provenance call this at start, so a bad DETECTOR_C2PA_TRUST_ANCHORS fails them there,
    with its name, rather than every image later."""
    _c2pa_context()


@functools.cache
def _c2pa_context():
    """One reader context per process: the trust anchors are read once. Nothing is ever
    fetched: c2pa-rs would otherwise GET a remote manifest URL that an upload names (a
    request to wherever the uploader likes) and OCSP responders."""
    import c2pa

    settings: dict = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
    anchors = os.environ.get(TRUST_ANCHORS_ENV)
    if anchors:
        from detector import storage

        try:
            pem = storage.read_bytes(anchors).decode()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{TRUST_ANCHORS_ENV}={anchors}: cannot read a PEM bundle "
                             f"({exc})") from None
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise ValueError(f"{TRUST_ANCHORS_ENV}={anchors} holds no PEM certificates")
        settings["trust"] = {"trust_anchors": pem}
    return c2pa.Context(c2pa.Settings.from_dict(settings))


def _c2pa(blob: bytes, mime: str) -> list[Evidence]:
    import c2pa

    try:  # try_create: None when there is no manifest (about 0.1 ms on a plain JPEG)
        reader = c2pa.Reader.try_create(mime, io.BytesIO(blob), None, _c2pa_context())
        if reader is None:
            return []
        with reader:
            state = reader.get_validation_state()
            manifest = reader.get_active_manifest() or {}
            results = (reader.get_validation_results() or {}).get("activeManifest", {})
    except c2pa.C2paError.NotSupported:
        return []  # a format C2PA does not define (BMP, ...)
    except c2pa.C2paError as err:
        # A manifest stored elsewhere is named, not fetched. c2pa-python 0.38 raises the
        # plain C2paError for it, with the library's "Remote: ..." message.
        if isinstance(err, c2pa.C2paError.RemoteManifest) or str(err).startswith("Remote"):
            return [Evidence("c2pa", "remote-manifest", INFO, _clip(f"not fetched: {err}"))]
        return [Evidence("c2pa", "error", INFO, _clip(f"unreadable manifest: {err}"))]
    return list(_c2pa_evidence(manifest, state, results))


def _c2pa_evidence(manifest: dict, state: str | None, results: dict) -> Iterator[Evidence]:
    failures = [f.get("code", "") for f in results.get("failure", [])]
    untrusted = "signingCredential.untrusted" in failures
    signer = (manifest.get("signature_info") or {}).get("issuer") or "unknown signer"
    generator = ", ".join(g.get("name", "") for g in manifest.get("claim_generator_info") or [])
    validity = {"Trusted": f"signed by {signer} (trusted)",
                "Valid": f"signed by {signer} ({'untrusted signer' if untrusted else 'valid'})"
                }.get(state, f"validation {state}: {', '.join(failures) or 'failed'}")
    for source_type in _source_types(manifest):
        name = source_type.removeprefix(IPTC_TYPES)
        detail = _clip(f"{name} from {generator or 'an unnamed generator'}; {validity}")
        if name in AI_SOURCE_TYPES:
            # An intact manifest that admits AI is decisive: nobody signs that falsely to
            # pass as real. One that fails validation was changed after signing: shown.
            strength = STRONG if state in ("Valid", "Trusted") else WEAK
            yield Evidence("c2pa", "ai-source-type", strength, detail)
        elif name in CAPTURE_SOURCE_TYPES:
            yield Evidence("c2pa", "capture-source-type", INFO, detail)


def _source_types(manifest: dict) -> list[str]:
    types = []
    for assertion in manifest.get("assertions") or []:
        if assertion.get("label") in ("c2pa.actions", "c2pa.actions.v2"):
            for action in (assertion.get("data") or {}).get("actions") or []:
                if isinstance(action, dict) and action.get("digitalSourceType"):
                    types.append(str(action["digitalSourceType"]))
    return list(dict.fromkeys(types))


# ------------------------------------------------------------------------------ metadata


def _metadata(image) -> Iterator[Evidence]:
    from PIL import Image

    yield from _xmp_evidence(_xmp(image))
    yield from _png_text(image.info)
    try:
        if image.format == "TIFF":  # EXIF tags are the TIFF's own, read with its header
            exif = image.getexif()
        else:  # the raw block only: PNG's getexif() would decode every pixel to find one
            exif = Image.Exif()
            if image.info.get("exif"):
                exif.load(image.info["exif"])
    except Exception as exc:  # (a malformed EXIF block)
        yield Evidence("exif", "error", INFO, _clip(f"unreadable EXIF: {exc}"))
        return
    yield from _exif(exif)


def _xmp(image) -> dict | Exception:
    try:
        return image.getxmp()  # parsed with defusedxml: no entity expansion
    except Exception as exc:  # (any malformed XMP is an evidence error)
        return exc


def _walk(node, key: str) -> Iterator[str]:
    """Values of `key` (namespace prefix ignored) anywhere in Pillow's XMP dict."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name.rsplit("}", 1)[-1].rsplit(":", 1)[-1] == key and isinstance(value, str):
                yield value
            yield from _walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def _xmp_evidence(xmp: dict | Exception) -> Iterator[Evidence]:
    if isinstance(xmp, Exception):
        yield Evidence("xmp", "error", INFO, _clip(f"unreadable XMP: {xmp}"))
        return
    for value in dict.fromkeys(_walk(xmp, "DigitalSourceType")):
        name = value.strip().removeprefix(IPTC_TYPES)
        if name in AI_SOURCE_TYPES:
            yield Evidence("xmp", "ai-source-type", STRONG, f"IPTC DigitalSourceType {name}")
        elif name in CAPTURE_SOURCE_TYPES:
            yield Evidence("xmp", "capture-source-type", INFO, f"IPTC DigitalSourceType {name}")
    for tool in dict.fromkeys(_walk(xmp, "CreatorTool")):
        if GENERATORS.search(tool):
            yield Evidence("xmp", "generator-software", STRONG, _clip(f"CreatorTool {tool}"))


def _png_text(info: dict) -> Iterator[Evidence]:
    parameters = info.get("parameters")
    if isinstance(parameters, str) and "Steps:" in parameters:
        settings = parameters[parameters.rfind("Steps:"):]
        yield Evidence("png-text", "generator-metadata", STRONG,
                       _clip(f"A1111 parameters: {settings}"))
    for key in ("prompt", "workflow"):
        text = info.get(key)
        if isinstance(text, str) and _is_json_object(text):
            yield Evidence("png-text", "generator-metadata", STRONG,
                           f"ComfyUI {key} ({len(text)} characters of graph)")


def _exif(exif) -> Iterator[Evidence]:
    software = _text(exif.get(0x0131))
    if software and GENERATORS.search(software):
        yield Evidence("exif", "generator-software", STRONG, _clip(f"Software {software}"))
    try:
        comment = _text(exif.get_ifd(0x8769).get(0x9286))  # Exif IFD: UserComment
    except Exception:  # (a broken Exif IFD is only a missing comment)
        comment = ""
    if "Steps:" in comment and "Sampler:" in comment:
        yield Evidence("exif", "generator-metadata", STRONG,
                       _clip(f"A1111 parameters: {comment[comment.rfind('Steps:'):]}"))
    make, model = _text(exif.get(0x010F)), _text(exif.get(0x0110))
    if make or model:
        camera = model if make and model.startswith(make) else f"{make} {model}".strip()
        yield Evidence("exif", "camera", WEAK, _clip(f"camera {camera} (EXIF is easily copied)"))


def _text(value) -> str:
    if isinstance(value, bytes):
        # UserComment starts with an 8-byte character code ("ASCII\0\0\0", "UNICODE\0").
        body = value[8:] if value[:8] in (b"ASCII\0\0\0", b"UNICODE\0", b"\0" * 8) else value
        encoding = "utf-16-be" if value[:8] == b"UNICODE\0" else "utf-8"
        value = body.decode(encoding, errors="replace")
    return value.strip("\0 \t\r\n") if isinstance(value, str) else ""


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the stack
        return False


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"
