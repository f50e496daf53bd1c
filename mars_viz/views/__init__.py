"""What the dashboard draws: plotly figures (`plots`, `map_plots`) and the per-input panels (`panels`). Pure:
no model, no gradio.

May import: `core`, `data`, `maps`, `steer` (its pure helpers), `analysis` (its result types).
"""
