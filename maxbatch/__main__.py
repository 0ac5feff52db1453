"""``python -m maxbatch``: the command line (also ``torchrun ... -m maxbatch probe model.py``)."""

from maxbatch.cli import main

if __name__ == "__main__":
    main(prog_name="maxbatch")
