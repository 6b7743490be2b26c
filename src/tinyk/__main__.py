"""`python -m tinyk` (what torchrun runs)."""

from tinyk.cli import main

if __name__ == "__main__":
    main()
