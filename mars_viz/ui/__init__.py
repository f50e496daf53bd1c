"""The Gradio dashboard. Wiring only: every callback calls the library; figures come from `mars_viz.views.figures`.

`create_app(session)` returns the Blocks without launching it (tests drive it in-process).
"""

from .app import create_app

__all__ = ["create_app"]
