"""What the dashboard draws: plotly figures (`figures`, their label layout in `layout`, the HTML / CSV export in
`export`; the input maps in `map_plots`), the per-input panels (`panels`) and an evaluation's report on disk
(`report`). Pure: no model, no gradio.

May import: `core`, `data`, `maps`, `steer` (its pure helpers), `analysis` (its result types).
"""
