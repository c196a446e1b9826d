"""Provenance evidence and the one verdict rule, on files the tests sign and write."""

from __future__ import annotations

import provenance_fixtures as fx
import pytest

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def chain():
    return fx.test_chain()


@pytest.fixture
def trust(monkeypatch, tmp_path):
    """Configure trust anchors (read once per process: the cache is reset around it)."""
    from detector import provenance

    def configure(pem: bytes) -> None:
        (tmp_path / "anchors.pem").write_bytes(pem)
        monkeypatch.setenv(provenance.TRUST_ANCHORS_ENV, str(tmp_path / "anchors.pem"))
        provenance._c2pa_context.cache_clear()

    yield configure
    provenance._c2pa_context.cache_clear()


def findings(blob: bytes) -> list[tuple[str, str, str]]:
    from detector.provenance import inspect

    return [(e.source, e.kind, e.strength) for e in inspect(blob)]


def test_c2pa_ai_manifest_is_strong_evidence_and_names_its_signer(chain, trust):
    from detector.provenance import inspect

    for image, mime in ((fx.photo(), "image/jpeg"), (fx.photo("PNG"), "image/png")):
        signed = fx.c2pa_signed(image, mime, fx.AI, chain, generator="Acme Diffusion")
        [evidence] = inspect(signed)
        assert (evidence.source, evidence.kind, evidence.strength) == \
            ("c2pa", "ai-source-type", "strong")
        assert "trainedAlgorithmicMedia from Acme Diffusion" in evidence.detail
        assert "untrusted signer" in evidence.detail  # no trust anchors configured
    trust(chain.root_pem)
    [evidence] = inspect(signed)
    assert "Detector Tests (trusted)" in evidence.detail


def test_c2pa_capture_claim_is_shown_but_the_classifier_decides(chain):
    from detector.artifact import ModelCard
    from detector.provenance import inspect

    signed = fx.c2pa_signed(fx.photo(), "image/jpeg", fx.CAPTURE, chain)
    evidence = inspect(signed)
    assert [(e.kind, e.strength) for e in evidence] == [("capture-source-type", "info")]
    card = ModelCard(name="m", architecture="vit", image_size=32, preprocess_version=1)
    assert card.decide(0.97, evidence) == ("ai-generated", "classifier")
    assert card.decide(0.03, evidence) == ("real", "classifier")


def test_an_ai_claim_decides_whatever_the_score(chain):
    from detector.artifact import ModelCard
    from detector.provenance import inspect

    card = ModelCard(name="m", architecture="vit", image_size=32, preprocess_version=1)
    signed = fx.c2pa_signed(fx.photo(), "image/jpeg", fx.AI, chain)
    for blob in (signed, fx.iptc_xmp_jpeg(), fx.a1111_png(), fx.comfyui_png()):
        assert card.decide(0.01, inspect(blob)) == ("ai-generated", "provenance")


def test_metadata_sources():
    assert findings(fx.iptc_xmp_jpeg()) == [("xmp", "ai-source-type", "strong")]
    assert findings(fx.iptc_xmp_jpeg(fx.CAPTURE)) == [("xmp", "capture-source-type", "info")]
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
    from detector.artifact import ModelCard
    from detector.provenance import inspect

    evidence = inspect(fx.camera_jpeg())
    assert [(e.source, e.kind, e.strength) for e in evidence] == [("exif", "camera", "weak")]
    assert "Canon EOS R5" in evidence[0].detail
    card = ModelCard(name="m", architecture="vit", image_size=32, preprocess_version=1)
    assert card.decide(0.99, evidence) == ("ai-generated", "classifier")


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
    from detector.provenance import inspect

    [evidence] = [e for e in inspect(bytes(edited)) if e.source == "c2pa"]
    assert (evidence.kind, evidence.strength) == ("ai-source-type", "weak")
    assert "mismatch" in evidence.detail
    assert findings(fx.xmp_entity_bomb_jpeg()) == [("xmp", "error", "info")]
    assert findings(fx.ztxt_bomb_png()) == [("metadata", "error", "info")]
    assert findings(b"") == findings(b"not an image at all") == []


def test_predictor_attaches_evidence_and_the_rule_decides(trained_tiny, chain):
    from detector.predictor import Predictor

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
    from detector import provenance

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
