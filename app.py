"""mars_viz dashboard: `python app.py [--model PATH_OR_ID] [--port N]` serves on 127.0.0.1."""

import argparse
import sys

from mars_viz.ui.launch import add_app_args, launch

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="mars_viz dashboard")
    add_app_args(parser)
    try:
        sys.exit(launch(parser.parse_args()))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
