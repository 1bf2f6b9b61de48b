"""``python -m sicot_cli ...``: the console script, for launchers such as ``torchrun -m sicot_cli train``."""

from sicot_cli.cli import app

if __name__ == "__main__":
    app(prog_name="sicot")
