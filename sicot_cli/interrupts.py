"""What stops a command as Ctrl-C does, and its exit code.

SIGTERM (sent by ``timeout``, Slurm, ``docker stop`` and ``kill``) is an interrupt like Ctrl-C: the
CLI installs :func:`interrupt` for it (:func:`sicot_cli.console.stop_on_sigterm`), so a training
run saves its checkpoint, prints one line and can be resumed; worker processes ignore both signals
(:mod:`sicot_cli.threads`: the parent stops them). The exit code is 128 + the signal, the shell's
convention (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import signal

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
_last_stop = [signal.SIGINT]  # the signal that stopped the command


def note_stop(signum: int) -> None:
    """Remember the signal that is stopping the command (a handler that defers the interrupt calls it)."""
    _last_stop[0] = signum


def interrupt(signum: int, _frame: object) -> None:
    """The CLI's SIGTERM handler: an interrupt like Ctrl-C (KeyboardInterrupt), the signal remembered."""
    note_stop(signum)
    raise KeyboardInterrupt


def stop_code() -> int:
    """The exit code of a command stopped by a signal: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + _last_stop[0]
