"""`python -m sicot_cli` (and `torchrun -m sicot_cli`) runs the CLI."""

from sicot_cli.cli import app

if __name__ == "__main__":
    app()
