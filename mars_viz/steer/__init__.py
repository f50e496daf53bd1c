"""Acting on generation: the MARS steering hook and its context manager (`steering`), and the steered/unsteered pair:
its strategies (`pair`), result types (`results`), cost measurement (`timing`), captures on the way (`captures`),
streaming (`stream`) and the greedy decoding they share (`generate`).

May import: `core`, `model`, `data`.
"""
