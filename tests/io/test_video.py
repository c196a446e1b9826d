"""Videos made with PyAV the way encoders write them (MP4 and MOV with H.264, WebM with
VP9): frames sampled over the duration through the image path's resize, every limit
checked on the header before decoding, broken files named by code, and a video's verdict
from its frames."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from video_fixtures import FORMATS, audio_only, claiming_hours, make_video, sample_frame

from detector.io import video
from detector.verdicts import frames
from detector.verdicts.verdict import classify, decide

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_frames_are_sampled_over_the_duration_through_the_image_resize(kind):
    import av

    blob = make_video(kind)
    assert video.looks_like_video(blob[:16])
    sampled = video.sample_frames(blob, 32, frames=6)
    assert sampled.pixels.shape == (6, 32, 32, 3) and sampled.pixels.dtype == np.uint8
    assert sampled.info.duration_s == pytest.approx(3.0, abs=0.2)
    assert (sampled.info.width, sampled.info.height) == (64, 48)
    # Each target is the middle of one sixth of the 3 s; the frame taken is the first at
    # or after it (8 frames a second).
    targets = (np.arange(6) + 0.5) * sampled.info.duration_s / 6
    assert np.all(sampled.times_s >= targets - 1e-6)
    assert np.all(sampled.times_s - targets < 1 / 8 + 1e-6)
    # The pixels are what the image path makes of the decoded frame.
    from detector.io.preprocess import square_pixels

    with av.open(io.BytesIO(blob)) as container:
        decoded = {round(f.time, 3): f.to_image() for f in container.decode(video=0)}
    for pixels, when in zip(sampled.pixels, sampled.times_s, strict=True):
        np.testing.assert_array_equal(pixels, square_pixels(decoded[round(when, 3)], 32))


def test_still_image_containers_are_not_videos():
    from PIL import Image

    from detector.io.preprocess import register_formats

    register_formats()
    image = Image.fromarray(sample_frame(1, 0))
    for fmt in ("HEIF", "AVIF", "PNG", "JPEG", "WEBP"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        assert not video.looks_like_video(buffer.getvalue()[:16]), fmt


@pytest.mark.parametrize("kind", sorted(FORMATS))
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_a_video_cut_short_is_truncated(kind, keep):
    blob = make_video(kind)
    with pytest.raises(video.VideoError) as raised:
        video.sample_frames(blob[: int(len(blob) * keep)], 32)
    assert raised.value.code == "truncated", raised.value.detail


def test_what_is_no_video_says_so():
    cases = {b"": "empty", b"plain text, not a container\n" * 4: "not-a-video",
             audio_only(): "not-a-video"}
    damaged = bytearray(make_video("webm"))
    damaged[40:400] = bytes(360)  # the header and the first frames, zeroed
    for blob, code in cases.items():
        with pytest.raises(video.VideoError) as raised:
            video.sample_frames(blob, 32)
        assert raised.value.code == code, (code, raised.value.detail)
    with pytest.raises(video.VideoError) as raised:
        video.sample_frames(bytes(damaged), 32)
    assert raised.value.code in ("corrupt", "not-a-video"), raised.value.detail


def test_limits_are_checked_on_the_header_before_anything_is_decoded():
    """Ten hours claimed by a 9 KB file: refused without decoding (a decoder asked for
    ten hours' worth of targets would seek 16 times and decode little, but a limit is a
    limit); frames over the pixel limit, and a file over the byte limit, likewise."""
    blob = make_video("mp4")
    long = claiming_hours(blob, 10)
    started = time.perf_counter()
    with pytest.raises(video.VideoError) as raised:
        video.sample_frames(long, 32)
    assert raised.value.code == "too-large" and "36000 s" in raised.value.detail
    assert time.perf_counter() - started < 5
    with pytest.raises(video.VideoError) as raised:
        video.sample_frames(blob, 32, limits=video.VideoLimits(max_pixels=64 * 47))
    assert raised.value.code == "too-large" and "64x48" in raised.value.detail
    with pytest.raises(video.VideoError) as raised:
        video.sample_frames(blob, 32, limits=video.VideoLimits(max_bytes=len(blob) - 1))
    assert raised.value.code == "too-large"


def test_the_frames_rule_decides_a_video():
    """Half or more of the frames confidently AI: ai-generated; a fifth to a half: a
    `frames` finding, uncertain; fewer: the classifier on the score half the frames reach."""
    threshold, margin = 0.5, 0.1

    def verdict(share_ai: int, of: int = 16) -> tuple[str, frames.FrameSummary]:
        scores = [0.95] * share_ai + [0.05] * (of - share_ai)
        summary = frames.summarize(scores, np.arange(of) / 8,
                                   lambda s: classify(s, threshold, margin))
        found = [summary.finding] if summary.finding else []
        return decide(summary.score_ai, threshold, margin, found)[0], summary

    assert verdict(16)[0] == verdict(8)[0] == "ai-generated"
    mixed_verdict, summary = verdict(5)
    assert mixed_verdict == "uncertain" and frames.mixed([summary.finding])
    assert "5 of 16 frames are confidently AI (at 0.0, 0.1, 0.2, 0.4, 0.5 s)" in \
        summary.finding.detail
    assert summary.worst_frame_s == 0.0
    assert verdict(3) == ("real", verdict(3)[1]) and verdict(3)[1].finding is None
    assert verdict(0)[0] == "real"


def test_predict_scores_a_video_by_its_frames(trained_tiny):
    """`detector predict` on videos: frames scored as the image path scores them, the
    video decided by the frames rule; AI frames make a higher score than real ones."""
    from detector.model.predictor import Predictor, VideoPrediction

    predictor = Predictor.from_uri(trained_tiny[0], backend="keras")
    size = predictor.image_size
    real = make_video("mp4", (0,) * 16, size=(size, size), lossless=True)
    fake = make_video("mp4", (1,) * 16, size=(size, size), lossless=True)
    spliced = make_video("webm", (0,) * 10 + (1,) * 6, size=(size, size), lossless=True)
    results = predictor.predict_bytes([real, fake, spliced, b"\x00\x00\x00\x18ftypisom"])
    for blob, result in zip([real, fake, spliced], results, strict=False):
        assert isinstance(result, VideoPrediction) and result.error is None, result
        sampled = video.sample_frames(blob, size)
        np.testing.assert_allclose(result.frame_scores, predictor.score(sampled.pixels),
                                   atol=1e-5)
        assert result.frames_scored == 16 and result.media == "video"
        assert result.frame_times_s == pytest.approx(list(sampled.times_s), abs=1e-3)
        summary = frames.summarize(result.frame_scores, sampled.times_s,
                                   lambda s: classify(s, predictor.card.threshold,
                                                      predictor.card.uncertain_margin))
        assert result.score_ai == pytest.approx(summary.score_ai, abs=1e-5)
        assert result.worst_frame_s == pytest.approx(summary.worst_frame_s, abs=1e-3)
    assert np.mean(results[1].frame_scores) > np.mean(results[0].frame_scores)
    assert results[3].error == "truncated" and results[3].media == "video"


def test_a_c2pa_signed_mp4_is_decided_by_its_manifest(trained_tiny):
    """A generator's MP4 with a signed C2PA manifest declaring trainedAlgorithmicMedia, as
    c2pa-python's Builder writes one into BMFF (Sora, Veo and Kling sign their videos):
    `ai-generated` by provenance, whatever the frames say, naming the claim generator;
    the same frames without the manifest are decided by the classifier."""
    from provenance_fixtures import AI, c2pa_signed, test_chain

    from detector.model.predictor import Predictor
    from detector.verdicts import provenance

    predictor = Predictor.from_uri(trained_tiny[0], backend="keras")
    plain = make_video("mp4", (0,) * 16, size=(predictor.image_size,) * 2, lossless=True)
    signed = c2pa_signed(plain, "video/mp4", AI, test_chain(), generator="Sora")
    found = provenance.inspect(signed)
    assert provenance.decisive(found) is not None, found
    assert provenance.named_generator(found) == "OpenAI Sora", found
    assert provenance.inspect(plain) == []
    result, unsigned = predictor.predict_bytes([signed, plain])
    assert (result.verdict, result.decided_by) == ("ai-generated", "provenance"), result
    assert result.generator == "OpenAI Sora" and result.frames_scored == 16
    assert unsigned.decided_by == "classifier"
    np.testing.assert_allclose(result.frame_scores, unsigned.frame_scores, atol=1e-5)


def test_comfyui_videos_are_decided_by_the_graphs_in_their_tags(trained_tiny):
    """ComfyUI writes its graphs into a video's container tags: the SaveVideo node as tags
    of their own (MP4), VideoHelperSuite's Video Combine as JSON in `comment` (MP4's ©cmt,
    WebM's COMMENT). Each is `ai-generated` by provenance naming ComfyUI; FFmpeg's own
    `encoder` tag (Lavf...) on an ordinary video says nothing."""
    from video_fixtures import comfyui_save_video, vhs_video_combine

    from detector.model.predictor import Predictor
    from detector.verdicts import provenance

    made = {"SaveVideo": comfyui_save_video(), "Video Combine mp4": vhs_video_combine("mp4"),
            "Video Combine webm": vhs_video_combine("webm")}
    for name, blob in made.items():
        found = provenance.inspect(blob)
        assert [(e.source, e.kind, e.strength, e.generator) for e in found] == [
            ("container", "generator-metadata", "strong", "ComfyUI")], (name, found)
    assert provenance.inspect(make_video("mp4")) == []
    predictor = Predictor.from_uri(trained_tiny[0], backend="keras")
    for result in predictor.predict_bytes(list(made.values())):
        assert (result.verdict, result.decided_by, result.generator) == (
            "ai-generated", "provenance", "ComfyUI"), result
        assert result.frames_scored == 16
