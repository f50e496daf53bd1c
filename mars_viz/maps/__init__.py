"""Where in the input: per-position scores over the image, the frames and the prompt's tokens.

May import: `core`, `model`, `data`, `steer`.
"""
