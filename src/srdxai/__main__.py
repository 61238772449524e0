"""``python -m srdxai``: the same as the ``srdxai`` command."""

from srdxai.cli import main

if __name__ == "__main__":
    main()
