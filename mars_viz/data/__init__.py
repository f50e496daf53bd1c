"""Bundled data and its readers: the prompt sets and their splits (`datasets`), the refusal judge (`judge`), the
example inputs (`examples`).

May import: `mars_viz.paths`, `model`.
"""
