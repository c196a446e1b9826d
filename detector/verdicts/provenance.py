"""Provenance evidence read from an image's (or a video's) own bytes, beside the pixel
classifier. A video's container is read for its C2PA manifest (MP4 and MOV carry one in
a BMFF box, as Sora, Veo and Kling write it; AVI in a RIFF chunk) and its metadata tags.

    c2pa        a C2PA manifest store (c2pa-python): the active manifest and, through
                ingredients, those it was made from; each one's IPTC digital source types,
                vendor AI assertions, claim generator and software agents, and its
                validation (an integrity failure never decides; a credential-only one,
                such as an expired certificate, leaves the claim intact; trust anchors
                from DETECTOR_C2PA_TRUST_ANCHORS, a PEM bundle)
    xmp         IPTC `Iptc4xmpExt:DigitalSourceType`, `xmp:CreatorTool`
    png-text    generator parameters: A1111 `parameters`, ComfyUI `prompt` / `workflow`
    exif        `Software` naming a known generator, A1111's `UserComment`, camera
                `Make` / `Model`
    stealth     A1111's "stealth pnginfo": parameters hidden in a PNG's low bits (alpha
                or RGB), found from the first pixel rows alone
    metadata    a metadata block Pillow refuses (a text chunk inflating past 1 MB)
    container   a video's metadata tags: ComfyUI's `prompt` / `workflow` graphs (its
                SaveVideo node writes them as tags of their own, VideoHelperSuite's Video
                Combine as JSON in `comment`), an `encoder` or `software` tag naming a
                generator (the rule for EXIF Software)

Each finding is an `Evidence` (source, kind, strength, detail, generator). Strength `strong` is
decisive (see `detector.verdicts.verdict`), `weak` and `info` are shown and never decide. Parsing
is bounded: Pillow reads headers only (no pixels) and caps text chunks, XMP goes through
defusedxml, and a malformed manifest or metadata block is an `error` finding, never an
exception. A finding that names the tool (a claim generator or software agent, a
front-end's own parameters, Software / CreatorTool) carries its name in `generator`, in
the words of `TOOLS` (the agent's own name for a C2PA AI action by an unlisted tool).
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

from detector.io import storage, video
from detector.io.preprocess import register_formats

STRONG, WEAK, INFO = "strong", "weak", "info"
AI_KINDS = ("ai-source-type", "ai-assertion", "generator-metadata", "generator-software")
TRUST_ANCHORS_ENV = "DETECTOR_C2PA_TRUST_ANCHORS"
REQUIRE_TRUSTED_ENV = "DETECTOR_C2PA_REQUIRE_TRUSTED"
# IPTC's Digital Source Type codes (cv.iptc.org/newscodes/digitalsourcetype/), compared
# as bare codes: files spell the URI with http or https, padded, in any case.
# A trained model made (some of) the image: decisive inside an intact claim.
AI_SOURCE_TYPES = frozenset({"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"})
# Made or changed by an algorithm that is not a trained model (or may not be): shown only.
SYNTHETIC_SOURCE_TYPES = frozenset({"algorithmicMedia", "compositeSynthetic",
                                    "algorithmicallyEnhanced"})
# A camera or scanner made it. Shown only: claims of "real" are what a forger writes.
CAPTURE_SOURCE_TYPES = frozenset({"digitalCapture", "computationalCapture", "negativeFilm",
                                  "positiveFilm", "print", "compositeCapture"})
IPTC_CODES = {code.lower(): code for code in
              AI_SOURCE_TYPES | SYNTHETIC_SOURCE_TYPES | CAPTURE_SOURCE_TYPES}
# Vendors' own AI assertions (early Adobe Firefly writes this and no source type).
AI_ASSERTIONS = frozenset({"com.adobe.generative-ai"})
# Claim generators and software agents that are image generators and nothing else.
AI_SERVICES = re.compile(
    r"\b(adobe[\s_-]?firefly|openai|dall[-·\s]?e|chatgpt|gpt-4o|gpt-image|sora|"
    r"microsoft designer|microsoft[\s_]responsible[\s_]ai|(bing |microsoft )?image creator|"
    r"google gemini|gemini|imagen|midjourney|stability ai|"
    r"stable[\s-]?diffusion|dreamstudio|leonardo\.ai|ideogram|flux\.1)\b", re.I)
AI_DESCRIPTION = re.compile(r"\bAI[\s-]+generated\b|\bgenerated\s+(by|with|using)\s+(an?\s+)?"
                            r"AI\b|\bgenerative\s+AI\b", re.I)
# Names in Software / CreatorTool that only image generators write.
GENERATORS = re.compile(
    r"\b(midjourney|dall[-·\s]?e|stable[\s-]?diffusion|sdxl|comfyui|automatic1111|novelai|"
    r"invokeai|fooocus|adobe firefly|leonardo\.ai|ideogram|imagen \d|flux\.1|draw things|"
    r"sd\.next)\b", re.I)
# Credit lines naming AI (Google writes photoshop:Credit "Made with Google AI").
AI_CREDIT = re.compile(r"\b(made|created|generated|edited)\s+(with|by|using)\s+(\S+\s+){0,2}AI\b",
                       re.I)
DETAIL_CHARS = 200  # evidence details are summaries, never whole prompts or manifests
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The generator a finding names, in the words of its own metadata: the first pattern
# that matches a claim generator, software agent, Software / CreatorTool or credit line
# names the tool (front-ends before the model family they run, vendors before their
# products' shared words).
TOOLS = tuple((re.compile(pattern, re.I), name) for pattern, name in (
    (r"adobe[\s_-]?firefly|com\.adobe\.generative-ai", "Adobe Firefly"),
    (r"\bdall[-·\s]?e\b", "OpenAI DALL-E"),
    (r"\bsora\b", "OpenAI Sora"),
    (r"\bopenai\b|chatgpt|gpt-4o|gpt-image", "OpenAI"),
    (r"microsoft designer", "Microsoft Designer"),
    (r"image creator", "Bing Image Creator"),
    (r"microsoft[\s_]responsible[\s_]ai", "Microsoft"),
    (r"\bgemini\b", "Google Gemini"),
    (r"\bimagen\b", "Google Imagen"),
    (r"\bgoogle ai\b", "Google AI"),
    (r"midjourney", "Midjourney"),
    (r"novelai", "NovelAI"),
    (r"comfyui", "ComfyUI"),
    (r"automatic1111|\ba1111\b", "AUTOMATIC1111"),
    (r"fooocus", "Fooocus"),
    (r"invokeai", "InvokeAI"),
    (r"sd\.next", "SD.Next"),
    (r"draw things", "Draw Things"),
    (r"leonardo\.ai", "Leonardo.Ai"),
    (r"ideogram", "Ideogram"),
    (r"flux\.1", "FLUX.1"),
    (r"dreamstudio|stability ai", "Stability AI"),
    (r"\bsdxl\b|stable[\s-]?diffusion[\s-]?xl", "Stable Diffusion XL"),
    (r"stable[\s-]?diffusion", "Stable Diffusion"),
))
# Bumped when a rule above changes what is found: a resumed scan then re-reads every row.
RULES_VERSION = 4  # 3: findings name their generator; 4: video container tags

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evidence:
    source: str  # c2pa | xmp | png-text | exif | stealth | metadata
    kind: str  # ai-source-type | ai-assertion | generator-metadata | generator-software |
    #            synthetic-source-type | camera | remote-manifest | error
    strength: str  # strong | weak | info
    detail: str
    generator: str | None = None  # the tool the finding names (TOOLS), if it names one

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def inspect(blob: bytes) -> list[Evidence]:
    """Every provenance finding in `blob`, strongest first; [] for an ordinary image or
    for bytes that are no image (decoding reports those)."""
    from PIL import Image


    register_formats()  # HEIC / JPEG XL carry XMP and EXIF too
    container = video.media_type(blob[:16])
    if container is not None:  # MP4/MOV (BMFF) and AVI carry C2PA manifests; WebM has none
        return _c2pa_findings(blob, container, list(_container_tags(blob)))
    try:
        with Image.open(io.BytesIO(blob)) as image:  # headers only: no pixels decoded
            mime = Image.MIME.get(image.format or "", "image/jpeg")
            # A JPEG carries its C2PA manifest in APP11 segments, which Pillow has just
            # listed: without one, the C2PA reader (0.1 ms) need not look.
            c2pa_possible = image.format != "JPEG" or any(
                marker == "APP11" for marker, _ in getattr(image, "applist", []))
            found = list(_metadata(image)) + list(_stealth(blob, image))
    except ValueError as exc:
        if not blob.startswith(PNG_SIGNATURE):
            return []  # not an image Pillow reads: decoding reports it
        # Pillow's caps on PNG text: a chunk inflating past 1 MB, or too many of them.
        mime, c2pa_possible = "image/png", True
        found = [Evidence("metadata", "error", INFO, _clip(str(exc)))]
    except Exception:  # (unreadable, or a pixel bomb: decoding says so)
        return []
    return _c2pa_findings(blob, mime, found) if c2pa_possible else _strongest_first(found)


def _c2pa_findings(blob: bytes, mime: str, found: list[Evidence] | None = None
                   ) -> list[Evidence]:
    """`found` and the C2PA manifest's findings, strongest first."""
    found = list(found or [])
    try:
        found += _c2pa(blob, mime)
    except Exception as exc:  # a manifest shaped unlike any spec: never the caller's crash
        log.warning("C2PA evidence failed: %s: %s", type(exc).__name__, exc)
        found.append(Evidence("c2pa", "error", INFO,
                              _clip(f"unreadable manifest: {type(exc).__name__}")))
    return _strongest_first(found)


def _strongest_first(found: list[Evidence]) -> list[Evidence]:
    order = {STRONG: 0, WEAK: 1, INFO: 2}
    return sorted(found, key=lambda e: order[e.strength])


def rules_id() -> str:
    """What a finding depends on besides the bytes: the rules and the trust anchors. A
    resumed scan reuses a row's evidence only under the same id."""
    anchors = os.environ.get(TRUST_ANCHORS_ENV, "")
    suffix = f"+anchors:{hashlib.sha1(anchors.encode()).hexdigest()[:8]}" if anchors else ""
    return f"{RULES_VERSION}{suffix}{'+trusted-only' if require_trusted() else ''}"


def decides(finding: Evidence) -> bool:
    """True for a finding that decides a verdict on its own: strong evidence of AI."""
    return finding.strength == STRONG and finding.kind in AI_KINDS


def decisive(evidence: Iterable[Evidence]) -> Evidence | None:
    """The first finding that decides a verdict on its own."""
    return next(filter(decides, evidence), None)


def named_generator(evidence: Iterable[Evidence]) -> str | None:
    """The generator that decisive evidence names (the first such finding's), or None
    when none of it names one (an IPTC source type alone, stealth bits)."""
    return next((e.generator for e in evidence if decides(e) and e.generator), None)


def tool_name(text: str) -> str | None:
    """The generator `text` names (`TOOLS`), or None."""
    return next((name for pattern, name in TOOLS if pattern.search(text)), None)


# ------------------------------------------------------------------------------ C2PA


def check_settings() -> None:
    """Read the C2PA settings now (trust anchors included): the processes that will read
    provenance call this at start, so a bad DETECTOR_C2PA_TRUST_ANCHORS fails them there,
    with its name, rather than every image later."""
    if require_trusted() and not _anchors():
        raise ValueError(f"{REQUIRE_TRUSTED_ENV} asks for trusted signers, but "
                         f"{TRUST_ANCHORS_ENV} names no trust anchors")
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
            store = json.loads(reader.json())
    except c2pa.C2paError.NotSupported:
        return []  # a format C2PA does not define (BMP, ...)
    except c2pa.C2paError as err:
        # A manifest stored elsewhere is named, not fetched. c2pa-python 0.38 raises the
        # plain C2paError for it, with the library's "Remote: ..." message.
        if isinstance(err, c2pa.C2paError.RemoteManifest) or str(err).startswith("Remote"):
            return [Evidence("c2pa", "remote-manifest", INFO,
                             _clip(f"remote manifest, not fetched: {err}"))]
        return [Evidence("c2pa", "error", INFO, _clip(f"unreadable manifest: {err}"))]
    return list(dict.fromkeys(c2pa_evidence(store)))


def c2pa_evidence(store: dict) -> Iterator[Evidence]:
    """Findings in a manifest store (c2pa-python's `Reader.json()`): the active manifest
    and, through their ingredients, the manifests it was made from (a service that
    re-encodes its output carries the generation step's claim as an ingredient)."""
    manifests = store.get("manifests") or {}
    active = store.get("active_manifest")
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    # (label, how it is reached, ingredient depth, its own failure codes, any integrity
    # failure on the way)
    queue = [(active, "active manifest", 0, _codes(results), False)]
    seen: set = set()
    while queue and len(seen) < MAX_MANIFESTS:
        label, path, depth, failures, broken_above = queue.pop(0)
        manifest = manifests.get(label) if isinstance(label, str) else None
        if not isinstance(manifest, dict) or label in seen:
            continue
        seen.add(label)
        broken = broken_above or any(not _credential_only(code) for code in failures)
        yield from _manifest_evidence(manifest, path, failures, broken)
        if depth >= MAX_INGREDIENT_DEPTH:
            continue
        for ingredient in manifest.get("ingredients") or []:
            if isinstance(ingredient, dict) and ingredient.get("active_manifest"):
                inner = (ingredient.get("validation_results") or {}).get("activeManifest")
                queue.append((ingredient["active_manifest"],
                              f"ingredient {_clip(str(ingredient.get('title', '?')))[:60]} "
                              f"of the {path}", depth + 1, _codes(inner or {}), broken))


MAX_MANIFESTS = 16  # manifests read from one store, ingredients' included
MAX_INGREDIENT_DEPTH = 4
# Validation failures of the credential alone: the claim and its hashes are intact, but
# the certificate has expired (with no trusted timestamp), is not on the trust list, or
# lacks a usage C2PA asks for. Every other failure code means the claim, an assertion,
# an ingredient or the image changed after signing, or the store cannot be read.
CREDENTIAL_CODES = ("signingCredential.", "timeStamp.", "claimSignature.outsideValidity")


CREDENTIAL_WORDS = {
    "signingCredential.untrusted": "untrusted signer",
    "signingCredential.expired": "certificate expired, no trusted timestamp",
    "signingCredential.invalid": "certificate not valid for C2PA signing",
    "signingCredential.ocsp.revoked": "certificate revoked",
}


def _credential_only(code: str) -> bool:
    return code.startswith(CREDENTIAL_CODES)


def _codes(results: dict) -> list[str]:
    return [str(f.get("code", "")) for f in results.get("failure") or [] if isinstance(f, dict)]


def _manifest_evidence(manifest: dict, path: str, failures: list[str],
                       broken: bool) -> Iterator[Evidence]:
    signer = (manifest.get("signature_info") or {}).get("issuer") or "unknown signer"
    generator = ", ".join(str(g.get("name", "")) for g in manifest.get("claim_generator_info")
                          or [] if isinstance(g, dict)) or str(manifest.get("claim_generator")
                                                               or "")
    credential = [c for c in failures if _credential_only(c)]
    if broken:
        state = f"validation failed: {', '.join(failures) or 'an ingredient'} (changed after " \
                "signing: never decides)"
    elif credential:  # the claim is intact: say what is wrong with its credential
        state = f"signed by {signer} ({', '.join(CREDENTIAL_WORDS.get(c, c) for c in credential)})"
    else:
        state = f"signed by {signer} ({'trusted' if _anchors() else 'valid'})"
    trusted = not broken and not credential and bool(_anchors())
    decides = not broken and (trusted or not require_trusted())
    where = f"in the {path}" + (f" from {generator}" if generator else "")
    actions = list(_actions(manifest))
    tool = _c2pa_tool(manifest, actions, generator)
    for code in dict.fromkeys(source_type_code(a.get("digitalSourceType")) for a in actions):
        kind = source_type_kind(code)
        if kind is not None:
            ai = kind == "ai-source-type"
            strength = (STRONG if decides else WEAK) if ai else INFO
            yield Evidence("c2pa", kind, strength, _clip(f"{code} {where}; {state}"),
                           tool if ai else None)
    for signal in _vendor_signals(manifest, actions, generator):
        yield Evidence("c2pa", "ai-assertion", STRONG if decides else WEAK,
                       _clip(f"{signal} {where}; {state}"), tool)


def _actions(manifest: dict) -> Iterator[dict]:
    for assertion in manifest.get("assertions") or []:
        if isinstance(assertion, dict) and str(assertion.get("label", "")).startswith(
                "c2pa.actions"):
            for action in (assertion.get("data") or {}).get("actions") or []:
                if isinstance(action, dict):
                    yield action


def source_type_code(value) -> str:
    """An IPTC digital source type as its bare code, whatever the spelling: http or
    https, padded, any case ("" when there is none)."""
    if not isinstance(value, str) or not value.strip():
        return ""
    code = value.strip().rstrip("/").rsplit("/", 1)[-1].strip()
    return IPTC_CODES.get(code.lower(), code)


def source_type_kind(code: str) -> str | None:
    """The evidence kind of a source-type code: AI (decisive where its claim holds),
    synthetic or camera (shown only), or None for codes that say neither."""
    if code in AI_SOURCE_TYPES:
        return "ai-source-type"
    if code in SYNTHETIC_SOURCE_TYPES:
        return "synthetic-source-type"
    return "camera" if code in CAPTURE_SOURCE_TYPES else None


def _vendor_signals(manifest: dict, actions: list[dict], generator: str) -> Iterator[str]:
    """AI named by a vendor's own assertion or words rather than a source type: early
    Adobe Firefly's `com.adobe.generative-ai`, a claim generator or an action's software
    agent that only image generators are, an action described as AI generated."""
    for label in _ai_assertions(manifest):
        yield f"assertion {label}"
    if generator and AI_SERVICES.search(generator):
        yield f"claim generator {generator}"
    for action in actions:
        agent = _agent(action)
        if agent and AI_SERVICES.search(agent):
            yield f"{action.get('action', 'action')} by {agent}"
        text = str(action.get("description") or "")
        if AI_DESCRIPTION.search(text):
            yield f"{action.get('action', 'action')} described as {text!r}"


def _ai_assertions(manifest: dict) -> list[str]:
    """The labels of a manifest's vendor AI assertions (`AI_ASSERTIONS`, any version)."""
    labels = (str(a.get("label", "")) for a in manifest.get("assertions") or []
              if isinstance(a, dict))
    return [label for label in labels if label.split(".v")[0] in AI_ASSERTIONS]


def _agent(action: dict) -> str:
    """An action's software agent by name (a string in claims v1, an object in v2)."""
    agent = action.get("softwareAgent")
    return str(agent.get("name", "")) if isinstance(agent, dict) else str(agent or "")


def _c2pa_tool(manifest: dict, actions: list[dict], generator: str) -> str | None:
    """The generator a manifest names: the first known tool (`TOOLS`) among the software
    agents of its AI actions, its other agents, its claim generator and a vendor's AI
    assertion; else an AI action's agent by its own name (the action says that agent
    made the image); else None (the claim says "AI" without saying which)."""
    ai_agents = [_agent(a) for a in actions
                 if source_type_code(a.get("digitalSourceType")) in AI_SOURCE_TYPES]
    texts = [*ai_agents, *map(_agent, actions), generator, *_ai_assertions(manifest)]
    known = next(filter(None, map(tool_name, filter(None, texts))), None)
    return known or next((_clip(a)[:60] for a in ai_agents if a), None)


def _anchors() -> bool:
    return bool(os.environ.get(TRUST_ANCHORS_ENV))


def require_trusted() -> bool:
    """DETECTOR_C2PA_REQUIRE_TRUSTED=1: a C2PA claim decides only when its signer chains
    to the configured trust anchors (needs DETECTOR_C2PA_TRUST_ANCHORS)."""
    return os.environ.get(REQUIRE_TRUSTED_ENV, "").strip().lower() in ("1", "true", "yes")


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
    for code in dict.fromkeys(map(source_type_code, _walk(xmp, "DigitalSourceType"))):
        kind = source_type_kind(code)
        if kind == "ai-source-type":
            yield Evidence("xmp", kind, STRONG, f"IPTC DigitalSourceType {code}")
        elif kind is not None:
            note = " (not a trained model)" if kind == "synthetic-source-type" else ""
            yield Evidence("xmp", kind, INFO, f"IPTC DigitalSourceType {code}{note}")
    for tool in dict.fromkeys(_walk(xmp, "CreatorTool")):
        if GENERATORS.search(tool):
            yield Evidence("xmp", "generator-software", STRONG, _clip(f"CreatorTool {tool}"),
                           tool_name(tool))
    for credit in dict.fromkeys(_walk(xmp, "Credit")):  # photoshop:Credit
        if AI_CREDIT.search(credit):
            yield Evidence("xmp", "generator-software", STRONG, _clip(f"Credit {credit}"),
                           tool_name(credit))


def _png_text(info: dict) -> Iterator[Evidence]:
    """Generator parameters in PNG text chunks, as each front-end writes them."""
    parameters = info.get("parameters")
    if isinstance(parameters, str) and "Steps:" in parameters:  # A1111, SD.Next, Forge
        settings = parameters[parameters.rfind("Steps:"):]
        yield Evidence("png-text", "generator-metadata", STRONG,
                       _clip(f"A1111 parameters: {settings}"), A1111)
    elif "fooocus_scheme" in info or _json_keys(parameters) & FOOOCUS_KEYS:
        yield Evidence("png-text", "generator-metadata", STRONG,
                       _clip(f"Fooocus parameters ({info.get('fooocus_scheme') or 'json'})"),
                       "Fooocus")
    for key in ("prompt", "workflow"):
        text = info.get(key)
        if isinstance(text, str) and _is_json_object(text):
            yield Evidence("png-text", "generator-metadata", STRONG,
                           f"ComfyUI {key} ({len(text)} characters of graph)", "ComfyUI")
    for key in INVOKEAI_KEYS:
        text = info.get(key)
        dream = key == "Dream" and isinstance(text, str) and bool(text.strip())
        if dream or (isinstance(text, str) and _is_json_object(text)):
            yield Evidence("png-text", "generator-metadata", STRONG,
                           f"InvokeAI {key} ({len(text)} characters)", "InvokeAI")
    software = info.get("Software")
    if isinstance(software, str) and GENERATORS.search(software):  # NovelAI
        source = info.get("Source")
        yield Evidence("png-text", "generator-software", STRONG, _clip(
            f"Software {software}" + (f" ({source})" if isinstance(source, str) else "")),
            tool_name(software))
    if _json_keys(info.get("Comment")) >= {"steps", "sampler"}:  # NovelAI's settings
        yield Evidence("png-text", "generator-metadata", STRONG, "generation settings in "
                       "Comment (steps, sampler, ...)", tool_name(str(info.get("Software"))))


def _container_tags(blob: bytes) -> Iterator[Evidence]:
    """Findings in a video container's metadata tags (read from its header by PyAV;
    nothing is decoded). Tag names are compared in lower case: Matroska writes them in
    upper case."""
    import av

    try:
        with av.open(io.BytesIO(blob), mode="r") as container:
            tags = {**{k.lower(): v for s in container.streams.video for k, v in
                       s.metadata.items()},
                    **{k.lower(): v for k, v in container.metadata.items()}}
    except (av.FFmpegError, ValueError, OSError):
        return  # an unreadable container: sampling its frames says why
    tags = {k: v for k, v in tags.items() if isinstance(v, str) and len(v) <= MAX_TAG_CHARS}
    graphs = [key for key in COMFYUI_GRAPHS if _is_json_object(tags.get(key, ""))]
    in_comment = sorted(_json_keys(tags.get("comment")) & set(COMFYUI_GRAPHS))
    if not graphs and in_comment:
        graphs = [f"comment ({', '.join(in_comment)})"]
    if graphs:
        yield Evidence("container", "generator-metadata", STRONG,
                       f"ComfyUI graph in the video's tags: {', '.join(graphs)}", "ComfyUI")
    for key in ("encoder", "software"):  # the tool fields, as EXIF Software is one
        text = tags.get(key, "")
        if GENERATORS.search(text):
            yield Evidence("container", "generator-software", STRONG,
                           _clip(f"{key} tag {text}"), tool_name(text))


COMFYUI_GRAPHS = ("prompt", "workflow")
MAX_TAG_CHARS = 1 << 20  # a tag longer than this is not read (PNG text has Pillow's 1 MB cap)


# A1111's "parameters" text: also written by its forks (Forge, SD.Next), named as one.
A1111 = "AUTOMATIC1111"
FOOOCUS_KEYS = frozenset({"base_model", "guidance_scale", "performance", "styles"})
INVOKEAI_KEYS = ("invokeai_metadata", "invokeai_graph", "sd-metadata", "Dream")


def _json_keys(text) -> set[str]:
    """The keys of a JSON object held in `text` (a bounded string), else none."""
    if not isinstance(text, str) or not text.lstrip().startswith("{"):
        return set()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return set()
    return {str(k).lower() for k in value} if isinstance(value, dict) else set()


def _exif(exif) -> Iterator[Evidence]:
    software = _text(exif.get(0x0131))
    if software and GENERATORS.search(software):
        yield Evidence("exif", "generator-software", STRONG, _clip(f"Software {software}"),
                       tool_name(software))
    try:  # UserComment: in the Exif IFD (A1111, piexif), or in IFD0 (Fooocus, Pillow)
        comment = _text(exif.get_ifd(0x8769).get(0x9286)) or _text(exif.get(0x9286))
    except Exception:  # (a broken Exif IFD is only a missing comment)
        comment = ""
    if "Steps:" in comment and "Sampler:" in comment:  # A1111 and Forge in JPEG / WebP
        yield Evidence("exif", "generator-metadata", STRONG,
                       _clip(f"A1111 parameters: {comment[comment.rfind('Steps:'):]}"), A1111)
    elif _json_keys(comment) & FOOOCUS_KEYS:
        yield Evidence("exif", "generator-metadata", STRONG,
                       "Fooocus parameters in UserComment", "Fooocus")
    # ComfyUI's WebP writer stores its graphs as "prompt:{json}" in Model and
    # "workflow:{json}" in Make (then ImageDescription...): no camera made those.
    graphs = [tag for tag in (0x010F, 0x0110, 0x010E)
              if re.match(r"\s*(prompt|workflow):\s*\{", _text(exif.get(tag)), re.I)]
    if graphs:
        names = ", ".join(_text(exif.get(t)).split(":", 1)[0].strip() for t in graphs)
        yield Evidence("exif", "generator-metadata", STRONG,
                       f"ComfyUI graph in EXIF ({names})", "ComfyUI")
    make, model = ("" if 0x010F in graphs else _text(exif.get(0x010F)),
                   "" if 0x0110 in graphs else _text(exif.get(0x0110)))
    if make or model:
        camera = model if make and model.startswith(make) else f"{make} {model}".strip()
        yield Evidence("exif", "camera", WEAK, _clip(f"camera {camera} (EXIF is easily copied)"))


def _text(value) -> str:
    """An EXIF value as text. UserComment starts with an 8-byte character code; A1111
    writes "UNICODE\0" then UTF-16 big-endian (piexif), other tools little-endian or
    even UTF-8."""
    if isinstance(value, bytes):
        code, body = value[:8], value[8:]
        if code == b"UNICODE\0":
            if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
                value = body.decode("utf-16", errors="replace")
            elif 0 not in body[:40]:  # no UTF-16 at all: some writers put UTF-8 here
                value = body.decode("utf-8", errors="replace")
            else:  # no BOM: text is mostly ASCII, whose zero byte comes first in BE
                zeros_first = body[0:40:2].count(0) >= body[1:40:2].count(0)
                value = body.decode("utf-16-be" if zeros_first else "utf-16-le",
                                    errors="replace")
        else:
            body = body if code in (b"ASCII\0\0\0", b"\0" * 8) else value
            value = body.decode("utf-8", errors="replace")
    return value.strip("\0 \t\r\n") if isinstance(value, str) else ""


# ------------------------------------------------------------------------------ stealth

# The stealth pnginfo extension (and NovelAI) write "stealth_" + png|rgb + info|comp,
# then the payload's length in bits (32, big-endian), then the payload (gzip for comp),
# one bit per pixel in the alpha channel's lowest bit (png) or three in R, G and B's
# (rgb), visiting pixels column by column. The signature and the length fill the first
# 152 pixels of the first column at most: only those rows are inflated and unfiltered.
STEALTH_SIGNATURES = {
    "alpha": (b"stealth_pnginfo", b"stealth_pngcomp"),
    "rgb": (b"stealth_rgbinfo", b"stealth_rgbcomp"),
}
STEALTH_BITS = 120 + 32  # the signature (15 bytes) and the payload's length
STEALTH_ROWS = {"RGBA": STEALTH_BITS, "RGB": -(-STEALTH_BITS // 3)}  # first-column pixels
STEALTH_SMALL_IMAGE = 1 << 20  # pixels: fully decoded when the first column is too short


def _stealth(blob: bytes, image) -> Iterator[Evidence]:
    if image.format != "PNG" or image.mode not in ("RGB", "RGBA"):
        return
    import numpy as np

    # RGB holds only the rgb variants: signature and length in pixels of 3 bits each.
    pixels = _png_first_column(blob, STEALTH_ROWS[image.mode])
    if pixels is None and image.width * image.height <= STEALTH_SMALL_IMAGE:
        try:  # short columns (or an interlaced file): small enough to decode whole
            whole = np.asarray(image.convert(image.mode))
        except Exception:  # (broken pixels: decoding reports them)
            return
        pixels = whole.transpose(1, 0, 2).reshape(-1, whole.shape[2])[:STEALTH_BITS]
    if pixels is None:
        return
    for mode, signatures in STEALTH_SIGNATURES.items():
        if mode == "alpha" and pixels.shape[1] < 4:
            continue
        bits = (pixels[:, 3] if mode == "alpha" else pixels[:, :3].reshape(-1)) & 1
        if len(bits) < STEALTH_BITS:
            continue
        signature = np.packbits(bits[:120]).tobytes()
        if signature in signatures:
            size = int.from_bytes(np.packbits(bits[120:STEALTH_BITS]).tobytes(), "big") // 8
            yield Evidence("stealth", "generator-metadata", STRONG,
                           f"A1111 stealth pnginfo in the {mode} channel's low bits "
                           f"({signature.decode()}, {size:,} bytes)")


def _png_first_column(blob: bytes, rows: int):
    """The first `rows` pixels of column 0 of an 8-bit, non-interlaced RGB(A) PNG, as a
    (rows, channels) uint8 array, inflating only those rows; None for any other PNG.
    A row's first pixel has no left neighbour, so each filter needs only the pixel above
    it: Sub and None add nothing, Up and Paeth add the pixel above, Average half of it."""
    import struct
    import zlib

    import numpy as np

    if len(blob) < 33 or blob[12:16] != b"IHDR":
        return None
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", blob[16:29])
    if depth != 8 or color not in (2, 6) or interlace or height < rows:
        return None
    channels = 3 if color == 2 else 4
    stride = 1 + width * channels
    wanted = rows * stride
    inflate, raw, at = zlib.decompressobj(), bytearray(), 8
    try:
        while at + 8 <= len(blob) and len(raw) < wanted:
            length, kind = struct.unpack(">I4s", blob[at:at + 8])
            if kind == b"IDAT":  # bounded: never more than the rows asked for
                raw += inflate.decompress(blob[at + 8:at + 8 + length], wanted - len(raw))
            elif kind == b"IEND":
                break
            at += 12 + length
    except zlib.error:
        return None
    if len(raw) < wanted:
        return None
    out, above = [], [0] * channels  # plain ints: 152 tiny rows cost more in numpy
    for row in range(rows):
        kind, start = raw[row * stride], row * stride + 1
        value = raw[start:start + channels]
        if kind in (2, 4):
            above = [(v + a) & 0xFF for v, a in zip(value, above, strict=True)]
        elif kind == 3:
            above = [(v + a // 2) & 0xFF for v, a in zip(value, above, strict=True)]
        elif kind in (0, 1):
            above = list(value)
        else:
            return None
        out.append(above)
    return np.array(out, dtype=np.uint8)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the stack
        return False


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"
