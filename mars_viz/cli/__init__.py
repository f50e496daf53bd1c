"""The command line (`python -m mars_viz ...`): `main` parses and dispatches, `bench` measures.

May import: everything in mars_viz; the lab graft (`mars_lab`) only inside the `graft` command.
"""
