"""`python -m tinyk` (what torchrun runs) and the `tinyk` command."""

import sys


def run() -> None:
    """Imports the CLI where a Ctrl-C is one line, not a traceback (a stage's module, torch included, is
    imported only once the command is known; under load even the 50 ms before that can take a Ctrl-C)."""
    try:
        from tinyk.cli import main
    except KeyboardInterrupt:
        print("tinyk: interrupted", file=sys.stderr)
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
