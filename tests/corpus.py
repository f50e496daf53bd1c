"""A corpus of bad (and odd but valid) inputs, generated in the test: (name, kind, path-or-text, expect).

expect is "ok" (processed, possibly with a note) or a regex the error message must match.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from mars_viz.model.media import neutral_video
from mars_viz.model.videoio import write_video


def _png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def build_corpus(root: Path) -> list[tuple[str, str, str, str]]:
    root.mkdir(parents=True, exist_ok=True)
    items: list[tuple[str, str, str, str]] = []

    def put(name: str, data: bytes, kind: str, expect: str) -> None:
        (root / name).write_bytes(data)
        items.append((name, kind, str(root / name), expect))

    noise = Image.effect_noise((64, 64), 60).convert("RGB")
    good_png = _png_bytes(noise)
    good_jpg = _png_bytes(noise, "JPEG")
    put("empty.png", b"", "image", "empty")
    put("text.png", b"hello, I am not a picture", "image", "not an image")
    put("truncated.png", good_png[: len(good_png) // 2], "image", "corrupt|truncated")
    put("truncated.jpg", good_jpg[: len(good_jpg) // 3], "image", "corrupt|truncated")
    put("bad_header.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 64, "image", "corrupt|not an image")
    put("page.jpg", b"<html><body>hi</body></html>", "image", "not an image")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("a.txt", "x")
    put("archive.png", zbuf.getvalue(), "image", "not an image")
    bomb = Image.new("1", (12_000, 12_000))  # 144 MP, a few KB compressed
    put("bomb.png", _png_bytes(bomb), "image", "too large")
    put("cmyk.jpg", _png_bytes(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), "image", "ok")
    put("sixteen.png", _png_bytes(Image.fromarray(np.arange(1024, dtype=np.uint16).reshape(32, 32) * 60,
                                                  mode="I;16")), "image", "ok")
    pal = Image.new("P", (16, 16), 1)
    pal.info["transparency"] = 1
    put("palette.png", _png_bytes(pal), "image", "ok")
    put("rgba.png", _png_bytes(Image.new("RGBA", (16, 16), (10, 200, 10, 40))), "image", "ok")
    put("la.png", _png_bytes(Image.new("LA", (16, 16), (100, 100))), "image", "ok")
    frames = [Image.new("P", (16, 16), i) for i in range(4)]
    gbuf = io.BytesIO()
    frames[0].save(gbuf, format="GIF", save_all=True, append_images=frames[1:])
    put("animated.gif", gbuf.getvalue(), "image", "ok")
    put("float.tiff", _png_bytes(Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32),
                                                 mode="F"), "TIFF"), "image", "ok")
    put("tiny.png", _png_bytes(Image.new("RGB", (1, 1), "red")), "image", "ok")
    put("wide.png", _png_bytes(Image.new("RGB", (4000, 8), "blue")), "image", "ok")
    # videos
    clip = root / "clip.mp4"
    write_video(clip, neutral_video(12, seed=1, size=64), fps=4)
    data = clip.read_bytes()
    put("empty.mp4", b"", "video", "empty")
    put("garbage.mp4", b"\x00\x01garbage" * 500, "video", "not a video|could not decode")
    put("truncated.mp4", data[: len(data) // 3], "video", "not a video|could not decode|no frames")
    put("image_as.mp4", good_png, "video", "ok|not a video|could not decode")
    put("video_as.png", data, "image", "not an image")
    one = root / "one_frame.mp4"
    write_video(one, neutral_video(1, seed=2, size=64), fps=1)
    items.append(("one_frame.mp4", "video", str(one), "ok"))
    many = root / "many_frames.mp4"
    write_video(many, neutral_video(300, seed=3, size=32), fps=30)
    items.append(("many_frames.mp4", "video", str(many), "ok"))
    long = root / "long.mp4"
    write_video(long, neutral_video(40, seed=4, size=32), fps=1)  # with max_seconds=10 in the test: capped
    items.append(("long.mp4", "video", str(long), "ok"))
    big = root / "big_frames.mp4"
    write_video(big, [Image.new("RGB", (1920, 1080), c) for c in ("red", "green", "blue")], fps=1)
    items.append(("big_frames.mp4", "video", str(big), "ok"))
    # prompts
    for name, text, expect in [("prompt_empty", "", "empty"), ("prompt_blank", " \n\t ", "empty"),
                               ("prompt_controls_only", "\x00\x01\x1b", "empty"),
                               ("prompt_enormous", "why " * 5000, "limit"),
                               ("prompt_controls_mixed", "hel\x00lo\x1b[31m there", "ok"),
                               ("prompt_unicode", "¿Qué es esto? 这是什么？ 🤖", "ok")]:
        items.append((name, "prompt", text, expect))
    return items
