import io

import numpy as np
import pytest
from PIL import Image

from mars_viz.model.media import load_image, neutral_images, prepare_image, read_video, typographic_image


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_prepare_image_any_mode_gives_rgb(mode):
    im = Image.new(mode, (20, 10))
    out = prepare_image(im)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_sixteen_bit_is_rescaled_not_clipped():
    arr = np.linspace(0, 65535, 100, dtype=np.uint16).reshape(10, 10)
    out = np.asarray(prepare_image(Image.fromarray(arr, mode="I;16")))
    assert out.min() == 0 and out.max() == 255  # plain convert("RGB") would clip nearly all to 255


def test_transparent_pixels_become_white():
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert prepare_image(im).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied():
    im = Image.new("RGB", (30, 10), "red")
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (10, 30)


def test_size_is_capped():
    assert max(prepare_image(Image.new("RGB", (3000, 1500)), max_side=512).size) == 512


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    p = tmp_path / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert load_image(p).mode == "RGB"


@pytest.mark.parametrize("payload, match", [(b"", "empty"), (b"not an image at all", "not an image"),
                                            (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt|not an image")])
def test_bad_image_bytes_raise_clear_error(tmp_path, payload, match):
    p = tmp_path / "x.png"
    p.write_bytes(payload)
    with pytest.raises(ValueError, match=match):
        load_image(p)


def test_truncated_png_raises(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    p = tmp_path / "t.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="corrupt|truncated"):
        load_image(p)


def test_read_video_samples_uniformly(video_file):
    v = read_video(video_file, num_frames=4)
    assert v.indices == [1, 4, 7, 10] and v.total_frames == 12 and len(v.frames) == 4
    assert v.fps == pytest.approx(4.0)
    # distinct solid colours: sampled frames differ from each other
    colours = {f.resize((1, 1)).getpixel((0, 0)) for f in v.frames}
    assert len(colours) == 4


def test_read_video_short_clip_uses_all_frames_and_says_so(video_file):
    v = read_video(video_file, num_frames=20)
    assert len(v.frames) == 12 and any("only 12 frames" in n for n in v.notes)


def test_read_video_duration_cap(video_file):
    v = read_video(video_file, num_frames=4, max_seconds=1.0)  # 4 fps -> first 4 frames only
    assert max(v.indices) < 4 and any("first 1s" in n for n in v.notes)


@pytest.mark.parametrize("payload", [b"", b"garbage" * 100])
def test_bad_video_raises(tmp_path, payload):
    p = tmp_path / "v.mp4"
    p.write_bytes(payload)
    with pytest.raises(ValueError):
        read_video(p)


def test_neutral_images_are_seeded_solid_colours():
    a, b = neutral_images(4, seed=1, size=8), neutral_images(4, seed=1, size=8)
    assert [im.getpixel((0, 0)) for im in a] == [im.getpixel((0, 0)) for im in b]
    assert all(len(set(im.getdata())) == 1 for im in a)
    assert neutral_images(4, seed=2, size=8)[0].getpixel((0, 0)) != a[0].getpixel((0, 0))


def test_typographic_image_draws_text():
    im = typographic_image("Steps to bake bread", numbered_steps=3)
    assert np.asarray(im).min() < 100  # some dark text pixels on white


def test_extreme_aspect_ratio_is_letterboxed():
    out = prepare_image(Image.new("RGB", (1000, 4), "blue"))
    assert out.size[0] == 1000 and out.size[0] / out.size[1] <= 20
    column = {out.getpixel((500, y)) for y in range(out.size[1])}
    assert out.getpixel((500, 0)) == (255, 255, 255) and (0, 0, 255) in column


@pytest.mark.parametrize("size", [(48, 48), (48, 64), (64, 64)])
def test_read_video_of_any_width_gives_the_files_frames(tmp_path, size):
    """decord 0.6 cannot convert frames 48 px wide (its padded rows); PyAV reads them instead, frame for frame."""
    from mars_viz.model.media import neutral_video
    from mars_viz.model.videoio import write_video

    src = [im.resize(size) for im in neutral_video(12, seed=1, size=64)]
    video = read_video(write_video(tmp_path / "clip.mp4", src, fps=4), num_frames=4)
    assert [f.size for f in video.frames] == [size] * 4
    for i, frame in zip(video.indices, video.frames, strict=True):  # each sampled frame is its source's colour
        got = np.asarray(frame, dtype=float).reshape(-1, 3).mean(0)
        assert np.abs(got - np.asarray(src[i], dtype=float).reshape(-1, 3).mean(0)).max() < 12
