"""Write small video files (PyAV). Used to make the bundled example clip and the videos tests read back with decord.

Example:
    >>> write_video("/tmp/clip.mp4", neutral_video(8), fps=4)    # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["write_video"]


def write_video(path: str | os.PathLike, frames: Sequence[Image.Image], fps: int = 4, codec: str = "mpeg4") -> str:
    """Encode RGB frames (all the same size, even sides) to `path`; returns the path."""
    import av

    if not frames:
        raise ValueError("no frames to write")
    w, h = frames[0].size
    w, h = w - w % 2, h - h % 2
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for im in frames:
            arr = np.asarray(im.convert("RGB").resize((w, h)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)
