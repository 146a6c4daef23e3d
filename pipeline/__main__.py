"""`python -m pipeline` runs the `mitoseg` command line."""

from pipeline.cli import main

if __name__ == "__main__":  # not when a spawned Dask worker process imports this module as its parent's main
    main()
