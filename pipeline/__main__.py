"""`python -m pipeline` runs the `mitoseg` command line."""

from pipeline.cli import main

main()
