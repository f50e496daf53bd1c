"""Running MARS on inputs and reporting: one input end to end (`analyze`), the evaluation over prompt sets
(`evaluate`), occlusion (`occlusion`) and the curated showcase (`showcase`).

May import: `core`, `model`, `data`, `steer`, `maps`, `fit`. Draws nothing: figures are `views`.
"""
