"""`python -m wsi_mil`: the same command line as `wsi-mil`."""

from .cli import app

app(prog_name="wsi-mil")
