"""Provenance evidence and the one verdict rule, on files the tests sign and write."""

from __future__ import annotations

import numpy as np
import provenance_fixtures as fx
import pytest

from detector.verdicts.verdict import decide_for

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def chain():
    return fx.test_chain()


@pytest.fixture
def trust(monkeypatch, tmp_path):
    """Configure trust anchors (read once per process: the cache is reset around it)."""
    from detector.verdicts import provenance

    def configure(pem: bytes) -> None:
        (tmp_path / "anchors.pem").write_bytes(pem)
        monkeypatch.setenv(provenance.TRUST_ANCHORS_ENV, str(tmp_path / "anchors.pem"))
        provenance._c2pa_context.cache_clear()

    yield configure
    provenance._c2pa_context.cache_clear()


def findings(blob: bytes) -> list[tuple[str, str, str]]:
    from detector.verdicts.provenance import inspect

    return [(e.source, e.kind, e.strength) for e in inspect(blob)]


def test_c2pa_ai_manifest_is_strong_evidence_and_names_its_signer(chain, trust):
    from detector.verdicts.provenance import inspect

    for image, mime in ((fx.photo(), "image/jpeg"), (fx.photo("PNG"), "image/png")):
        signed = fx.c2pa_signed(image, mime, fx.AI, chain, generator="Acme Diffusion")
        [evidence] = inspect(signed)
        assert (evidence.source, evidence.kind, evidence.strength) == \
            ("c2pa", "ai-source-type", "strong")
        assert "trainedAlgorithmicMedia in the active manifest from Acme Diffusion" \
            in evidence.detail
        assert "untrusted signer" in evidence.detail  # no trust anchors configured
    trust(chain.root_pem)
    [evidence] = inspect(signed)
    assert "Detector Tests (trusted)" in evidence.detail


def test_c2pa_capture_claim_is_shown_but_the_classifier_decides(chain):
    from detector.model.artifact import ModelCard
    from detector.verdicts.provenance import inspect

    signed = fx.c2pa_signed(fx.photo(), "image/jpeg", fx.CAPTURE, chain)
    evidence = inspect(signed)
    assert [(e.kind, e.strength) for e in evidence] == [("camera", "info")]
    assert "digitalCapture in the active manifest" in evidence[0].detail
    assert "signed by Detector Tests (untrusted signer)" in evidence[0].detail
    card = ModelCard(name="m", architecture="vit", image_size=32, preprocess_version=1)
    assert decide_for(card, 0.97, evidence) == ("ai-generated", "classifier")
    assert decide_for(card, 0.03, evidence) == ("real", "classifier")


def test_an_ai_claim_decides_whatever_the_score(chain):
    from detector.model.artifact import ModelCard
    from detector.verdicts.provenance import inspect

    card = ModelCard(name="m", architecture="vit", image_size=32, preprocess_version=1)
    signed = fx.c2pa_signed(fx.photo(), "image/jpeg", fx.AI, chain)
    for blob in (signed, fx.iptc_xmp_jpeg(), fx.a1111_png(), fx.comfyui_png()):
        assert decide_for(card, 0.01, inspect(blob)) == ("ai-generated", "provenance")


def test_metadata_sources():
    assert findings(fx.iptc_xmp_jpeg()) == [("xmp", "ai-source-type", "strong")]
    assert findings(fx.iptc_xmp_jpeg(fx.CAPTURE)) == [("xmp", "camera", "info")]
    assert findings(fx.a1111_png()) == [("png-text", "generator-metadata", "strong")]
    assert findings(fx.comfyui_png()) == [("png-text", "generator-metadata", "strong")] * 2
    assert findings(fx.photo(xmp=fx.xmp_packet(
        "<xmp:CreatorTool>Midjourney v7</xmp:CreatorTool>"))) == \
        [("xmp", "generator-software", "strong")]
    # Ordinary metadata is no evidence: a PNG comment, an editor's CreatorTool.
    assert findings(fx.png_with_text(Comment="holiday", parameters="no settings here")) == []
    assert findings(fx.photo(xmp=fx.xmp_packet(
        "<xmp:CreatorTool>Adobe Photoshop 25.0</xmp:CreatorTool>"))) == []
    assert findings(fx.photo()) == []


def test_camera_exif_is_weak_and_never_decides():
    from detector.model.artifact import ModelCard
    from detector.verdicts.provenance import inspect

    evidence = inspect(fx.camera_jpeg())
    assert [(e.source, e.kind, e.strength) for e in evidence] == [("exif", "camera", "weak")]
    assert "Canon EOS R5" in evidence[0].detail
    card = ModelCard(name="m", architecture="vit", image_size=32, preprocess_version=1)
    assert decide_for(card, 0.99, evidence) == ("ai-generated", "classifier")


def test_malformed_manifests_and_metadata_bombs_are_evidence_errors_not_crashes(chain):
    signed = fx.c2pa_signed(fx.photo(), "image/jpeg", fx.AI, chain)
    broken = bytearray(signed)
    at = broken.index(b"jumb")
    broken[at:at + 4] = b"jXmb"
    assert findings(bytes(broken)) == [("c2pa", "error", "info")]
    # A signed file edited afterwards: the manifest reads, but fails validation, so its AI
    # claim is shown, not decisive.
    edited = bytearray(signed)
    edited[-200] ^= 0xFF  # inside the image data the manifest hashes
    from detector.verdicts.provenance import inspect

    [evidence] = [e for e in inspect(bytes(edited)) if e.source == "c2pa"]
    assert (evidence.kind, evidence.strength) == ("ai-source-type", "weak")
    assert "mismatch" in evidence.detail
    assert findings(fx.xmp_entity_bomb_jpeg()) == [("xmp", "error", "info")]
    assert findings(fx.ztxt_bomb_png()) == [("metadata", "error", "info")]
    assert findings(b"") == findings(b"not an image at all") == []


def test_predictor_attaches_evidence_and_the_rule_decides(trained_tiny, chain):
    from detector.model.predictor import Predictor

    predictor = Predictor.from_uri(trained_tiny[0], backend="keras")
    signed = fx.c2pa_signed(fx.photo(), "image/jpeg", fx.AI, chain)
    plain, ai, broken = predictor.predict_bytes([fx.photo(), signed, b"\xff\xd8 truncated"])
    assert plain.decided_by == "classifier" and plain.evidence == []
    assert (ai.verdict, ai.decided_by) == ("ai-generated", "provenance")
    assert ai.evidence[0]["source"] == "c2pa" and ai.score_ai is not None
    assert broken.error and broken.verdict is None and broken.decided_by is None


def test_remote_manifests_are_named_never_fetched():
    """An upload naming a remote manifest URL must not make us GET it (c2pa-rs would by
    default): the finding says so, and the listener sees no request."""
    import http.server
    import threading

    from PIL import PngImagePlugin

    hits = []

    class Listener(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/manifest.c2pa"
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", fx.xmp_packet("").decode().replace(
            'rdf:about=""', f'rdf:about="" xmlns:dcterms="http://purl.org/dc/terms/" '
            f'dcterms:provenance="{url}"'))
        assert findings(fx.photo("PNG", pnginfo=info)) == [("c2pa", "remote-manifest", "info")]
        assert hits == []
    finally:
        server.shutdown()


def test_a_bad_trust_anchor_setting_fails_at_start(trust, tmp_path, monkeypatch):
    from detector.verdicts import provenance

    trust(b"not a certificate")
    with pytest.raises(ValueError, match=r"DETECTOR_C2PA_TRUST_ANCHORS=.*no PEM certificates"):
        provenance.check_settings()
    monkeypatch.setenv(provenance.TRUST_ANCHORS_ENV, str(tmp_path / "missing.pem"))
    provenance._c2pa_context.cache_clear()
    with pytest.raises(ValueError, match="cannot read a PEM bundle"):
        provenance.check_settings()


def test_metadata_is_read_without_decoding_pixels():
    """A PNG header claiming 144 M pixels over a tiny body: reading its metadata must not
    decode it (Pillow's PNG getexif() would)."""
    import struct
    import time
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 12_000, 12_000, 8, 2, 0, 0, 0)
    png = fx.PNG_SIGNATURE + chunk(b"IHDR", header) + \
        chunk(b"tEXt", b"parameters\0cat\nSteps: 20, Sampler: Euler") + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    started = time.perf_counter()
    assert findings(png) == [("png-text", "generator-metadata", "strong")]
    assert time.perf_counter() - started < 1.0


def test_deeply_nested_json_loses_no_other_finding():
    assert findings(fx.png_with_text(prompt="[" * 200_000, parameters=(
        "cat\nSteps: 20, Sampler: Euler a"))) == [("png-text", "generator-metadata", "strong")]


# ------------------------------------------------------------- what real services write


def test_an_ai_claim_in_an_ingredient_decides_and_says_which_manifest_made_it(chain):
    """ChatGPT / DALL-E via Bing re-encode what the generator made: the delivered file's
    active manifest only converts; the generation step's claim is its ingredient's."""
    from detector.verdicts.provenance import inspect

    made = fx.c2pa_signed(fx.photo(), "image/jpeg", fx.AI, chain, generator="Image Model")
    delivered = fx.c2pa_signed(fx.photo(seed=2), "image/jpeg", None, chain,
                               generator="Acme Web App", parent=made,
                               actions=[{"action": "c2pa.converted"}])
    evidence = inspect(delivered)
    [claim] = [e for e in evidence if e.kind == "ai-source-type"]
    assert claim.strength == "strong"
    assert "in the ingredient generated.jpg of the active manifest from Image Model" \
        in claim.detail
    # Twice removed (an edit of the delivered file) still finds it, bounded in depth.
    edited = fx.c2pa_signed(fx.photo(seed=3), "image/jpeg", None, chain, parent=delivered,
                            actions=[{"action": "c2pa.edited"}])
    assert any(e.kind == "ai-source-type" and e.strength == "strong" for e in inspect(edited))


def test_vendor_assertions_agents_and_descriptions_name_ai_without_a_source_type(chain):
    """Early Adobe Firefly (`com.adobe.generative-ai`, claim v1, no source type), Bing
    Image Creator (an AI software agent, "AI Generated Image"): strong inside an intact
    claim; a camera app's claim generator is nothing."""
    from detector.verdicts.provenance import inspect

    firefly = fx.c2pa_signed(fx.photo(), "image/jpeg", None, chain, generator="Adobe_Firefly",
                             claim_version=1, assertions=[{
                                 "label": "com.adobe.generative-ai",
                                 "data": {"description": "Adobe Firefly", "version": "1.0.0"}}])
    kinds = {(e.kind, e.strength, e.detail.split(" in the")[0]) for e in inspect(firefly)}
    assert kinds == {("ai-assertion", "strong", "assertion com.adobe.generative-ai"),
                     ("ai-assertion", "strong", "claim generator Adobe_Firefly")}
    bing = fx.c2pa_signed(fx.photo(), "image/jpeg", None, chain, claim_version=1,
                          generator="Microsoft Responsible AI Image Provenance", actions=[{
                              "action": "c2pa.created", "description": "AI Generated Image",
                              "softwareAgent": "Bing Image Creator"}])
    details = [e.detail for e in inspect(bing)]
    assert any("c2pa.created by Bing Image Creator" in d for d in details)
    assert any("described as 'AI Generated Image'" in d for d in details)
    camera = fx.c2pa_signed(fx.photo(), "image/jpeg", None, chain, claim_version=1,
                            generator="Acme Camera App", actions=[{"action": "c2pa.created"}])
    assert inspect(camera) == []
    tampered = bytearray(firefly)
    tampered[-200] ^= 0xFF
    assert {e.strength for e in inspect(bytes(tampered)) if e.source == "c2pa"} == {"weak"}


@pytest.mark.parametrize("uri", [
    "https://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia",
    "  http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia\n",
    "http://cv.iptc.org/newscodes/digitalsourcetype/TRAINEDALGORITHMICMEDIA/",
    "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia",
])
def test_source_type_uris_in_every_spelling(chain, uri):
    assert findings(fx.c2pa_signed(fx.photo(), "image/jpeg", uri, chain)) == \
        [("c2pa", "ai-source-type", "strong")]
    assert findings(fx.iptc_xmp_jpeg(uri)) == [("xmp", "ai-source-type", "strong")]


def test_algorithmic_media_is_shown_and_never_decides(chain):
    """IPTC's algorithmicMedia is made by an algorithm that is not a trained model."""
    from detector.model.artifact import ModelCard
    from detector.verdicts.provenance import inspect

    uri = "http://cv.iptc.org/newscodes/digitalsourcetype/algorithmicMedia"
    evidence = inspect(fx.c2pa_signed(fx.photo(), "image/jpeg", uri, chain))
    assert [(e.kind, e.strength) for e in evidence] == [("synthetic-source-type", "info")]
    card = ModelCard(name="m", architecture="vit", image_size=32, preprocess_version=1)
    assert decide_for(card, 0.03, evidence) == ("real", "classifier")
    assert findings(fx.iptc_xmp_jpeg(uri)) == [("xmp", "synthetic-source-type", "info")]


def test_an_expired_certificate_leaves_the_claim_intact_and_deciding(trust, monkeypatch):
    """A short-lived service certificate that has expired since (no trusted timestamp):
    the claim and its hashes are intact, so it decides, with the credential state shown.
    Requiring trusted signers (DETECTOR_C2PA_REQUIRE_TRUSTED) then demotes it."""
    import time

    from detector.verdicts import provenance
    from detector.verdicts.provenance import inspect

    expiring = fx.test_chain(expired=True)
    signed = fx.c2pa_signed(fx.photo(), "image/jpeg", fx.AI, expiring)
    time.sleep(3)  # past the certificate's end
    trust(expiring.root_pem)
    [evidence] = inspect(signed)
    assert (evidence.kind, evidence.strength) == ("ai-source-type", "strong")
    assert "certificate expired, no trusted timestamp" in evidence.detail
    monkeypatch.setenv(provenance.REQUIRE_TRUSTED_ENV, "1")
    assert [e.strength for e in inspect(signed)] == ["weak"]
    assert provenance.rules_id().endswith("+trusted-only")
    monkeypatch.delenv(provenance.TRUST_ANCHORS_ENV)
    with pytest.raises(ValueError, match="names no trust anchors"):
        provenance.check_settings()


@pytest.mark.parametrize("make", [
    lambda: fx.a1111_exif("JPEG"), lambda: fx.a1111_exif("WEBP"),
    lambda: fx.a1111_exif("JPEG", byte_order="le"),
    lambda: fx.a1111_exif("WEBP", byte_order="utf8"),
], ids=["a1111-jpeg", "a1111-webp", "utf16-le-jpeg", "utf8-webp"])
def test_a1111_parameters_in_exif_user_comment(make):
    from detector.verdicts.provenance import inspect

    [evidence] = inspect(make())
    assert (evidence.source, evidence.kind, evidence.strength) == \
        ("exif", "generator-metadata", "strong")
    assert "Steps: 30, Sampler: DPM++ 2M Karras" in evidence.detail


def test_comfyui_graphs_in_webp_exif_are_generator_metadata_not_a_camera():
    evidence = findings(fx.comfyui_webp())
    assert evidence == [("exif", "generator-metadata", "strong")]


@pytest.mark.parametrize("make, source, kind", [
    (fx.fooocus_png, "png-text", "generator-metadata"),
    (fx.fooocus_jpeg, "exif", "generator-metadata"),
    (fx.invokeai_png, "png-text", "generator-metadata"),
    (lambda: fx.invokeai_png("sd-metadata"), "png-text", "generator-metadata"),
    (lambda: fx.invokeai_png("Dream"), "png-text", "generator-metadata"),
    (fx.novelai_png, "png-text", "generator-software"),
], ids=["fooocus", "fooocus-jpeg", "invokeai", "invokeai-2", "invokeai-dream", "novelai"])
def test_front_ends_metadata_decides(make, source, kind):
    from detector.model.artifact import ModelCard
    from detector.verdicts.provenance import inspect

    evidence = inspect(make())
    assert (source, kind, "strong") in {(e.source, e.kind, e.strength) for e in evidence}
    card = ModelCard(name="m", architecture="vit", image_size=32, preprocess_version=1)
    assert decide_for(card, 0.01, evidence) == ("ai-generated", "provenance")


def test_credit_lines_naming_ai_decide_and_ordinary_ones_do_not():
    def credit(text: str):
        return findings(fx.photo(xmp=fx.xmp_packet(
            f'<photoshop:Credit xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/">{text}'
            "</photoshop:Credit>")))

    assert credit("Made with Google AI") == [("xmp", "generator-software", "strong")]
    assert credit("Edited with Google AI") == [("xmp", "generator-software", "strong")]
    assert credit("Reuters / Jane Doe") == credit("Made with love in Lisbon") == []


@pytest.mark.parametrize("mode, compressed, size, interlaced", [
    ("alpha", True, (200, 180), False),  # the extension's default
    ("alpha", False, (200, 180), False),
    ("rgb", True, (200, 180), False),
    ("rgb", False, (64, 30), False),  # short columns: the whole (small) image is read
    ("alpha", True, (300, 60), False),
    ("alpha", True, (200, 180), True),  # interlaced: likewise
], ids=["alpha-comp", "alpha-info", "rgb-comp", "rgb-info-short", "alpha-short", "interlaced"])
def test_a1111_stealth_pnginfo_in_the_low_bits(mode, compressed, size, interlaced):
    from detector.verdicts.provenance import inspect

    [evidence] = inspect(fx.stealth_png(mode, compressed, size, interlaced))
    assert (evidence.source, evidence.kind, evidence.strength) == \
        ("stealth", "generator-metadata", "strong")
    assert f"stealth_{'png' if mode == 'alpha' else 'rgb'}" in evidence.detail


def test_ordinary_pngs_have_no_stealth_finding_and_the_read_is_bounded():
    """Random low bits, a plain RGBA PNG, a 16-bit one: nothing; the first-column reader
    inflates only the rows it needs from a PNG whose pixels would fill 64 MB."""
    import io

    import numpy as np
    from PIL import Image

    from detector.verdicts.provenance import _png_first_column

    assert findings(fx.photo("PNG")) == []
    rgba = io.BytesIO()
    Image.fromarray(np.full((200, 200, 4), 255, np.uint8)).save(rgba, "PNG")
    assert findings(rgba.getvalue()) == []
    wide = io.BytesIO()
    Image.new("RGBA", (4096, 4096), (9, 8, 7, 255)).save(wide, "PNG")
    column = _png_first_column(wide.getvalue(), 152)
    assert column.shape == (152, 4) and (column == (9, 8, 7, 255)).all()
    for blob in (fx.stealth_png(), fx.photo("PNG", size=(64, 160)), fx.stealth_png("rgb")):
        whole = np.asarray(Image.open(io.BytesIO(blob)))  # every filter type, unfiltered
        assert (_png_first_column(blob, 152) == whole[:152, 0]).all()


@pytest.mark.parametrize("fmt, mime", [("HEIF", "image/heic"), ("AVIF", "image/avif")])
def test_heic_and_avif_carry_their_provenance(chain, fmt, mime):
    """An iPhone's HEIC and an AVIF: XMP and EXIF as Pillow and pillow-heif expose them,
    and a C2PA manifest as c2pa-python reads it in either container."""
    import io

    import numpy as np
    from PIL import Image

    from detector.io.preprocess import register_formats

    register_formats()

    def image(**save) -> bytes:
        pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt, **save)
        return buffer.getvalue()

    xmp = fx.xmp_packet(f"<Iptc4xmpExt:DigitalSourceType>{fx.AI}</Iptc4xmpExt:DigitalSourceType>")
    assert findings(image(xmp=xmp)) == [("xmp", "ai-source-type", "strong")]
    exif = Image.Exif()
    exif[0x0131] = "Midjourney v7"
    assert findings(image(exif=exif.tobytes())) == [("exif", "generator-software", "strong")]
    assert findings(fx.c2pa_signed(image(), mime, fx.AI, chain)) == \
        [("c2pa", "ai-source-type", "strong")]
    assert findings(image()) == []


@pytest.mark.parametrize("make, named", [
    (fx.chatgpt_image, "OpenAI"),
    (lambda chain: fx.chatgpt_image(chain, "JPEG"), "OpenAI"),
    (lambda chain: fx.c2pa_signed(fx.photo(), "image/jpeg", None, chain, claim_version=1,
                                  generator="Adobe_Firefly", assertions=[{
                                      "label": "com.adobe.generative-ai",
                                      "data": {"description": "Adobe Firefly"}}]),
     "Adobe Firefly"),
    (lambda chain: fx.c2pa_signed(fx.photo(), "image/jpeg", None, chain, claim_version=1,
                                  generator="Microsoft Responsible AI Image Provenance",
                                  actions=[{"action": "c2pa.created",
                                            "description": "AI Generated Image",
                                            "softwareAgent": "Bing Image Creator"}]),
     "Bing Image Creator"),
    # An AI action by a tool no list knows: the claim says which agent made it.
    (lambda chain: fx.c2pa_signed(fx.photo(), "image/jpeg", None, chain,
                                  generator="Acme Web App", actions=[{
                                      "action": "c2pa.created", "digitalSourceType": fx.AI,
                                      "softwareAgent": {"name": "Acme Diffusion 2"}}]),
     "Acme Diffusion 2"),
    (lambda chain: fx.a1111_png(), "AUTOMATIC1111"),
    (lambda chain: fx.a1111_exif("WEBP"), "AUTOMATIC1111"),
    (lambda chain: fx.comfyui_png(), "ComfyUI"),
    (lambda chain: fx.comfyui_webp(), "ComfyUI"),
    (lambda chain: fx.novelai_png(), "NovelAI"),
    (lambda chain: fx.fooocus_jpeg(), "Fooocus"),
    (lambda chain: fx.invokeai_png("sd-metadata"), "InvokeAI"),
    (lambda chain: fx.photo(xmp=fx.xmp_packet(
        "<xmp:CreatorTool>Midjourney v7</xmp:CreatorTool>")), "Midjourney"),
    (lambda chain: fx.photo(xmp=fx.xmp_packet(
        '<photoshop:Credit xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/">Made with '
        "Google AI</photoshop:Credit>")), "Google AI"),
    # AI, but no tool named: the classifier's head (if any) answers instead.
    (lambda chain: fx.iptc_xmp_jpeg(), None),
    (lambda chain: fx.stealth_png(), None),
    (lambda chain: fx.c2pa_signed(fx.photo(), "image/jpeg", fx.AI, chain,
                                  generator="Acme Web App"), None),
], ids=["chatgpt", "chatgpt-jpeg", "firefly", "bing", "unlisted-agent", "a1111-png", "a1111-webp",
        "comfyui", "comfyui-webp", "novelai", "fooocus", "invokeai", "midjourney",
        "google-credit", "iptc-only", "stealth", "unnamed-c2pa"])
def test_provenance_names_the_generator_when_the_file_does(chain, make, named):
    from detector.verdicts.attribution import attribute
    from detector.verdicts.provenance import inspect, named_generator

    evidence = inspect(make(chain))
    assert named_generator(evidence) == named
    # It decides the generator whatever a head says; with none named, the head answers.
    head = np.array([0.1, 0.85, 0.05])
    answer = attribute("ai-generated", evidence, head, ["a", "b", "c"], {"threshold": 0.5})
    assert (answer.generator, answer.decided_by) == \
        ((named, "provenance") if named else ("b", "classifier"))
    assert [s["generator"] for s in answer.scores] == ["b", "a", "c"]
