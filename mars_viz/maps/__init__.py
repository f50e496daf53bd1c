"""Where in the input: per-position scores over the image, the frames and the prompt's tokens. `layout` places the
media tokens on grids per architecture, `scoring` scores every position (`InputMap`, `rescore`), `offsets` holds the
fit-time forwards (the neutral inputs' per-position offsets), `export` writes a map as CSV.

May import: `core`, `model`, `data`, `steer`.
"""
