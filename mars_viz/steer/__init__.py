"""Acting on generation: the MARS steering hook and its context manager (`steering`), and generation of the
steered/unsteered pair (`generate`).

May import: `core`, `model`, `data`.
"""
