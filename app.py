"""mars_viz dashboard: `python app.py [--model PATH_OR_ID] [--port N]` serves on 127.0.0.1.

Any other `--host` needs `--auth USER:PASS` (or the env var MARS_VIZ_AUTH) or an explicit `--insecure-public`; see
`python app.py --help` for the server's limits (--allow-any-model, --max-new-tokens-limit, --session-ttl, --tmp-dir).
"""

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
