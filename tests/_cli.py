"""What the CLI tests share."""

from zsq.cli import main


def exit_code(argv: list[str]) -> int:
    """``main``'s status; argparse's own checks (choices, int) exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code
