"""``python -m sicot_cli ...``: the console script, for launchers such as ``torchrun -m sicot_cli train``."""

from sicot_cli.cli import main

if __name__ == "__main__":
    main()
