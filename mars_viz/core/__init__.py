"""MARS maths and the fitted state: the rule (`rule`: score, gate, trust region, displacement), the layer-selection
statistics (`selection`), the 2-D projections (`projection`), and `MarsState` (`state`: what a fit saves).

Pure functions on tensors and arrays. May import: nothing else in mars_viz (no model, no hooks, no plots).
"""
