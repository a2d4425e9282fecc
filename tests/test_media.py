"""engine.media: image formats, video sampling, and clear errors for bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.media import (IMAGE_EXTS, VIDEO_EXTS, MediaError, VideoClip, content_hash,
                          load_image, load_media, load_video, media_kind)

# ------------------------------------------------------------------------------------------
# fixtures


def _gradient(w=64, h=48):
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    a[..., 2] = 90
    return Image.fromarray(a)


def _frame_colour(i: int) -> tuple[int, int, int]:
    """A colour that encodes frame index i (0..15) so order survives lossy codecs."""
    return (min(255, 16 * i + 8), 255 - min(255, 16 * i + 8), 128)


def _decode_index(img: Image.Image) -> int:
    r = float(np.asarray(img)[16:-16, 16:-16, 0].mean())
    return int(round((r - 8) / 16))


@pytest.fixture
def mp4_path(tmp_path):
    import cv2

    path = tmp_path / "clip.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (64, 64))
    assert w.isOpened()
    for i in range(16):
        r, g, b = _frame_colour(i)
        w.write(np.full((64, 64, 3), (b, g, r), np.uint8))  # BGR
    w.release()
    return path


@pytest.fixture
def gif_path(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (48, 48), _frame_colour(i)) for i in range(12)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


# ------------------------------------------------------------------------------------------
# images


@pytest.mark.parametrize("fmt,ext", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"),
                                     ("BMP", ".bmp"), ("GIF", ".gif"), ("TIFF", ".tiff")])
def test_image_formats(tmp_path, fmt, ext):
    path = tmp_path / f"img{ext}"
    _gradient().save(path, fmt)
    assert media_kind(path) == "image"
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (64, 48)
    # and the same from bytes
    im2 = load_image(path.read_bytes())
    assert im2.size == (64, 48)
    assert load_media(path)[0].size == (64, 48)


def test_rgba_png_composited_on_white(tmp_path):
    a = np.zeros((20, 20, 4), np.uint8)
    a[:10, :, :] = (255, 0, 0, 255)  # opaque red top half, transparent bottom half
    path = tmp_path / "alpha.png"
    Image.fromarray(a, "RGBA").save(path)
    px = np.asarray(load_image(path))
    assert tuple(px[2, 2]) == (255, 0, 0)
    assert tuple(px[15, 15]) == (255, 255, 255)


def test_palette_transparency_and_grey_modes(tmp_path):
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    p.paste(1, (0, 0, 4, 8))
    p.info["transparency"] = 0
    path = tmp_path / "pal.png"
    p.save(path, transparency=0)
    px = np.asarray(load_image(path))
    assert tuple(px[0, 0]) == (10, 200, 10) and tuple(px[0, 7]) == (255, 255, 255)
    Image.new("LA", (5, 5), (0, 0)).save(tmp_path / "la.png")
    assert tuple(np.asarray(load_image(tmp_path / "la.png"))[0, 0]) == (255, 255, 255)
    Image.new("I;16", (5, 5)).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").mode == "RGB"


def test_jpeg_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "rot.jpg"
    im.save(path, "JPEG", exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    px = np.asarray(out).astype(int)
    assert px[5, 10, 0] > 200 and px[5, 10, 2] < 60  # red now on top
    assert px[35, 10, 2] > 200


def test_corrupt_truncated_and_bomb_images(tmp_path):
    path = tmp_path / "a.png"
    _gradient(200, 200).save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="trunc.png"):
        load_image(tmp_path / "trunc.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(MediaError, match="junk.png"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(MediaError, match="too large"):
        load_image(path, max_pixels=100 * 100)
    with pytest.raises(MediaError, match="empty"):
        load_image(b"")
    with pytest.raises(MediaError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    assert issubclass(MediaError, ValueError)


# ------------------------------------------------------------------------------------------
# videos


def test_mp4_sampling_order_and_timestamps(mp4_path):
    assert media_kind(mp4_path) == "video"
    clip = load_video(mp4_path, num_frames=8)
    assert isinstance(clip, VideoClip)
    assert len(clip.frames) == 8 == len(clip.timestamps)
    assert all(f.mode == "RGB" and f.size == (64, 64) for f in clip.frames)
    idx = [_decode_index(f) for f in clip.frames]
    assert idx == [1, 3, 5, 7, 9, 11, 13, 15]  # centres of 8 equal segments of 16 frames
    assert all(b > a for a, b in zip(clip.timestamps, clip.timestamps[1:]))
    assert clip.fps == pytest.approx(8.0)
    assert clip.duration == pytest.approx(2.0)
    assert clip.total_frames == 16


def test_mp4_fixed_rate_sampling(mp4_path):
    clip = load_video(mp4_path, fps=2.0)  # 2 s clip at 2 fps -> 4 frames, every 4th frame
    assert [_decode_index(f) for f in clip.frames] == [0, 4, 8, 12]
    assert clip.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert len(load_video(mp4_path, fps=8.0, max_frames=5).frames) == 5


def test_animated_gif_is_a_video(gif_path):
    assert media_kind(gif_path) == "video"
    clip = load_video(gif_path, num_frames=4)
    assert [_decode_index(f) for f in clip.frames] == [1, 4, 7, 10]
    assert all(b > a for a, b in zip(clip.timestamps, clip.timestamps[1:]))
    assert clip.timestamps[0] == pytest.approx(0.1, abs=1e-6)
    frames = load_media(gif_path, num_frames=6)
    assert len(frames) == 6
    # a short clip asked for more frames than it has repeats frames, never fails
    assert len(load_video(gif_path, num_frames=20).frames) == 20
    # the image loader still gives the first frame
    assert _decode_index(load_image(gif_path)) == 0


def test_single_frame_gif_is_an_image(tmp_path):
    path = tmp_path / "still.gif"
    Image.new("RGB", (10, 10), (1, 2, 3)).save(path)
    assert media_kind(path) == "image"
    with pytest.raises(MediaError, match="still image"):
        load_video(path)


def test_broken_empty_and_fake_videos(tmp_path, mp4_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        load_video(empty)
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 20)
    with pytest.raises(MediaError, match="notes.mp4"):
        load_video(fake)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(mp4_path.read_bytes()[:300])
    with pytest.raises(MediaError, match="broken.mp4"):
        load_video(broken)
    with pytest.raises(MediaError):
        load_video(tmp_path / "missing.mp4")
    jpg = tmp_path / "x.jpg"
    _gradient().save(jpg)
    with pytest.raises(MediaError, match="image"):
        load_video(jpg)


def test_media_kind_sniffs_and_rejects(tmp_path, mp4_path):
    assert ".png" in IMAGE_EXTS and ".mp4" in VIDEO_EXTS
    noext = tmp_path / "upload"
    noext.write_bytes(mp4_path.read_bytes())
    assert media_kind(noext) == "video"
    img_noext = tmp_path / "upload2"
    _gradient().save(img_noext, "PNG")
    assert media_kind(img_noext) == "image"
    txt = tmp_path / "readme.txt"
    txt.write_text("hello")
    with pytest.raises(MediaError, match="not a supported"):
        media_kind(txt)


def test_content_hash(tmp_path):
    import hashlib

    data = b"some bytes" * 1000
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert content_hash(p) == content_hash(str(p)) == content_hash(data) == want
    assert content_hash(io.BytesIO(data)) == want
