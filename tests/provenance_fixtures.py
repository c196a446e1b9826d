"""Images carrying provenance, made by the tests themselves: C2PA manifests signed with
c2pa-python's Builder and a test certificate chain, IPTC XMP, generator PNG chunks,
camera EXIF, and malformed metadata."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, PngImagePlugin

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AI = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
CAPTURE = "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"


def photo(fmt: str = "JPEG", size: tuple[int, int] = (96, 64), seed: int = 0, **save) -> bytes:
    """A small textured image with whatever metadata `save` passes to Pillow."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **save)
    return buffer.getvalue()


@dataclass(frozen=True)
class Chain:
    root_pem: bytes
    leaf_pem: bytes
    key_pem: bytes


def test_chain(expired: bool = False) -> Chain:
    """A root CA and an ES256 signing certificate with the extensions C2PA requires;
    `expired`: the signing certificate expires seconds after signing (as a short-lived
    service certificate has by the time its file is read), no timestamp to rescue it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def usage(**chosen) -> x509.KeyUsage:
        flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment",
                               "data_encipherment", "key_agreement", "key_cert_sign",
                               "crl_sign", "encipher_only", "decipher_only"), False)
        return x509.KeyUsage(**(flags | chosen))

    now = dt.datetime.now(dt.UTC)
    root_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), \
        ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Detector Test Root"),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Detector Tests")])
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Detector Test Signer"),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Detector Tests")])
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=20))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()),
                           critical=False)
            .sign(root_key, hashes.SHA256()))
    # c2pa-rs refuses to sign with an expired certificate: `expired` makes one that ends
    # two seconds from now, and its files are read after that.
    ends = now + (dt.timedelta(seconds=2) if expired else dt.timedelta(days=30))
    leaf = (x509.CertificateBuilder().subject_name(leaf_name).issuer_name(root_name)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=10))
            .not_valid_after(ends)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return Chain(root.public_bytes(pem), leaf.public_bytes(pem),
                 leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))


def c2pa_signed(image: bytes, mime: str, source_type: str | None, chain: Chain,
                generator: str = "Test Image Generator", actions: list | None = None,
                assertions: list | None = None, parent: bytes | None = None,
                claim_version: int = 2) -> bytes:
    """`image` with a signed C2PA manifest, written the way c2pa-python's Builder writes
    it (no thumbnail, no timestamp authority: offline and small). By default one
    c2pa.created action declaring `source_type`; `actions` and `assertions` replace or add
    to that; `parent`, a signed file this one was made from (as a service that re-encodes
    its generator's output does), becomes the parentOf ingredient that a c2pa.opened
    action names, with its manifest carried along. `claim_version=1` writes a claim as
    tools before C2PA 2.0 did (early Adobe Firefly, Bing Image Creator), where a
    c2pa.created action need not name a source type."""
    import c2pa

    if actions is None:
        created = {"action": "c2pa.created"}
        if source_type is not None:
            created["digitalSourceType"] = source_type
        actions = [created]
    if parent is not None:
        actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": ["parent"]}},
                   *actions]
    manifest = {"claim_generator_info": [{"name": generator, "version": "1.0"}],
                "claim_version": claim_version, "title": "fixture", "assertions": [
                    {"label": "c2pa.actions", "data": {"actions": actions}},
                    *(assertions or [])]}
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(
        c2pa.C2paSigningAlg.ES256, chain.leaf_pem, chain.key_pem, None))
    context = c2pa.Context(c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
    builder = c2pa.Builder(manifest, context)
    if parent is not None:
        builder.add_ingredient({"title": "generated.jpg", "relationship": "parentOf",
                                "label": "parent"}, mime, io.BytesIO(parent))
    out = io.BytesIO()
    # sign() returns the manifest bytes; the signed asset is what it writes to `out`.
    builder.sign(signer, mime, io.BytesIO(image), out)
    return out.getvalue()


def chatgpt_image(chain: Chain, fmt: str = "PNG") -> bytes:
    """What ChatGPT writes for GPT-4o images: claim generator ChatGPT, a c2pa.created
    action by the GPT-4o agent declaring trainedAlgorithmicMedia, then c2pa.converted by
    the OpenAI API."""
    return c2pa_signed(photo(fmt), f"image/{fmt.lower()}", None, chain, generator="ChatGPT",
                       actions=[{"action": "c2pa.created", "digitalSourceType": AI,
                                 "softwareAgent": {"name": "GPT-4o"}},
                                {"action": "c2pa.converted",
                                 "softwareAgent": {"name": "OpenAI API"}}])


def xmp_packet(body: str) -> bytes:
    return (
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" '
        'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        f'xmlns:xmp="http://ns.adobe.com/xap/1.0/">{body}</rdf:Description></rdf:RDF>'
        '</x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def iptc_xmp_jpeg(source_type: str = AI) -> bytes:
    return photo(xmp=xmp_packet(
        f"<Iptc4xmpExt:DigitalSourceType>{source_type}</Iptc4xmpExt:DigitalSourceType>"))


def png_with_text(**chunks: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    return photo("PNG", pnginfo=info)


def a1111_png() -> bytes:
    return png_with_text(parameters="a lighthouse at dusk, oil painting\nNegative prompt: blurry\n"
                         "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, "
                         "Size: 512x512, Model: sd_xl_base_1.0")


def comfyui_png() -> bytes:
    graph = {"3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}},
             "4": {"class_type": "CheckpointLoaderSimple",
                   "inputs": {"ckpt_name": "flux.safetensors"}}}
    return png_with_text(prompt=json.dumps(graph), workflow=json.dumps({"nodes": []}))


def camera_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS R5"
    return photo(exif=exif)


def xmp_entity_bomb_jpeg() -> bytes:
    """XMP whose DTD defines nested entities (a "billion laughs"): defusedxml refuses it."""
    lol = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
           + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
                     for i in range(1, 10))
           + ']><x:xmpmeta xmlns:x="adobe:ns:meta/">&lol9;</x:xmpmeta>')
    return photo(xmp=lol.encode())


def ztxt_bomb_png() -> bytes:
    """A PNG whose compressed text chunk inflates to 64 MB (from about 64 KB)."""
    png = photo("PNG")
    data = b"parameters\0\0" + zlib.compress(b"A" * (64 << 20), 9)
    body = b"zTXt" + data
    chunk = (len(data)).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    head = png.index(b"IDAT") - 4  # before the first IDAT: read by Image.open itself
    return png[:head] + chunk + png[head:]


A1111_PARAMETERS = ("a lighthouse at dusk, oil painting\nNegative prompt: blurry\nSteps: 30, "
                    "Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
                    "Model: sd_xl_base_1.0")


def user_comment(text: str, byte_order: str = "be") -> bytes:
    """EXIF UserComment as piexif.helper.UserComment.dump(text, encoding="unicode") writes
    it for A1111 (the UNICODE code, then UTF-16 big-endian), or little-endian as some
    other writers do (or even UTF-8)."""
    encoding = {"be": "utf-16-be", "le": "utf-16-le", "utf8": "utf-8"}[byte_order]
    return b"UNICODE\0" + text.encode(encoding)


def a1111_exif(fmt: str = "JPEG", byte_order: str = "be") -> bytes:
    """A1111 saving JPEG or WebP: its parameters in the Exif IFD's UserComment."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = user_comment(A1111_PARAMETERS, byte_order)
    return photo(fmt, exif=exif)


def comfyui_webp() -> bytes:
    """ComfyUI's SaveAnimatedWEBP: "prompt:{json}" in Model (0x0110) and each extra
    pnginfo entry, the workflow first, as "key:{json}" from Make (0x010F) downwards."""
    graph = {"3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}}}
    exif = Image.Exif()
    exif[0x0110] = "prompt:" + json.dumps(graph)
    exif[0x010F] = "workflow:" + json.dumps({"nodes": [], "links": []})
    return photo("WEBP", exif=exif)


def fooocus_png() -> bytes:
    """Fooocus's metadata scheme: `parameters` as a JSON object and `fooocus_scheme`."""
    return png_with_text(parameters=json.dumps({
        "prompt": "a lighthouse", "negative_prompt": "", "styles": "['Fooocus V2']",
        "performance": "Speed", "resolution": "(1024, 1024)", "guidance_scale": 4,
        "base_model": "juggernautXL_v8Rundiffusion.safetensors", "version": "Fooocus v2.5.5"}),
        fooocus_scheme="fooocus")


def fooocus_jpeg() -> bytes:
    """Fooocus saving JPEG/WebP: its JSON parameters as UserComment, its version as
    Software and the scheme as MakerNote, all in IFD0 (as Pillow writes a plain Exif)."""
    exif = Image.Exif()
    exif[0x9286] = json.dumps({"prompt": "a lighthouse", "base_model": "juggernautXL.safetensors",
                               "guidance_scale": 4, "performance": "Speed"})
    exif[0x0131], exif[0x927C] = "Fooocus v2.5.5", "fooocus"
    return photo(exif=exif)


def invokeai_png(key: str = "invokeai_metadata") -> bytes:
    """InvokeAI 3+ (`invokeai_metadata`, `invokeai_graph`), 2.x (`sd-metadata`), 1.x
    (`Dream`, its command line)."""
    if key == "Dream":
        return png_with_text(Dream='"a lighthouse" -s 50 -S 1234 -W 512 -H 512 -C 7.5 -A k_lms')
    return png_with_text(**{key: json.dumps({"positive_prompt": "a lighthouse", "seed": 1,
                                             "steps": 30, "model": {"name": "sdxl"}})})


def novelai_png() -> bytes:
    """NovelAI: `Software` NovelAI, `Source` the model, `Comment` the settings as JSON."""
    return png_with_text(Title="NovelAI generated image", Software="NovelAI",
                         Source="NovelAI Diffusion V4 4F6B4A8B",
                         Description="a lighthouse at dusk",
                         Comment=json.dumps({"prompt": "a lighthouse", "steps": 28,
                                             "sampler": "k_euler_ancestral", "seed": 1,
                                             "scale": 5.0}))


def stealth_png(mode: str = "alpha", compressed: bool = True, size: tuple[int, int] = (200, 180),
                interlaced: bool = False) -> bytes:
    """A1111's stealth pnginfo extension (ashen-sensored/sd_webui_stealth_pnginfo): the
    signature, the payload's length in bits (32, big-endian) and the payload (gzip when
    `compressed`), bit by bit into the alpha channel's lowest bit after putalpha(255)
    ("alpha") or into R, G and B's ("rgb"), visiting pixels column by column; no text
    chunks left. `size` (width, height); a short image spills into the next columns."""
    signature = f"stealth_{'png' if mode == 'alpha' else 'rgb'}{'comp' if compressed else 'info'}"
    text = A1111_PARAMETERS.encode()
    payload = gzip.compress(text) if compressed else text
    bits = "".join(format(byte, "08b") for byte in signature.encode())
    bits += format(len(payload) * 8, "032b")
    bits += "".join(format(byte, "08b") for byte in payload)
    width, height = size
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    per_pixel = 1 if mode == "alpha" else 3
    assert len(bits) <= width * height * per_pixel, "image too small for the payload"
    for index in range(0, len(bits), per_pixel):
        x, y = divmod(index // per_pixel, height)
        for channel, bit in enumerate(bits[index:index + per_pixel]):
            target = 3 if mode == "alpha" else channel
            pixels[y, x, target] = (pixels[y, x, target] & 0xFE) | int(bit)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, "PNG", optimize=not interlaced,
                                         interlace=interlaced)
    return buffer.getvalue()
