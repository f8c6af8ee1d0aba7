"""``python -m titlegen``: start the command line."""

from titlegen.cli import main

if __name__ == "__main__":
    main()
