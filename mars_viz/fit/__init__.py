"""Fitting a state: the calibration pipeline (`calibrate`) and the on-disk cache of fitted states (`cache`).

May import: `core`, `model`, `data`, `steer`, `maps`.
"""
