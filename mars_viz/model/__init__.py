"""Model access: loading a backbone (`backbone`), turning media and prompts into model inputs (`inputs`,
`media`, `videoio`), the hooks that read and write the residual stream (`hooks`, `activations`), the tiny demo
models, and the project's own lab model type (`reader`).

May import: `mars_viz.paths` only. Knows nothing of MARS.
"""
