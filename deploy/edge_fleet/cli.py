"""The ``edge-fleet`` command line: the operator's tool.

Each command lives in the module named after what it does; a module adds its
sub-commands in ``register`` and sets ``func`` on them.  Every command that
talks to the broker takes the flags of ``broker.add_broker_args``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from edge_contract import __version__
from edge_contract.errors import AgentError

from . import (
    assignments,
    broker,
    deploy,
    enroll,
    identity,
    inventory,
    jobs,
    provision_cmd,
    releases,
    rollout_cmd,
    server_cmd,
    setup,
    simulate,
    views,
)
from .server import command as server_command

#: Modules that add sub-commands, in the order ``--help`` lists them; each has ``register(sub)``.
_COMMAND_MODULES = (
    jobs,
    views,
    inventory,
    releases,
    deploy,
    rollout_cmd,
    assignments,
    simulate,
    provision_cmd,
    identity,
    enroll,
    setup,
    server_command,
    server_cmd,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-fleet", description="Operate a fleet of edge-agent boxes.")
    parser.add_argument("--version", action="version", version=f"edge-fleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-fleet`` console script."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (AgentError, broker.FleetError) as exc:
        print(f"edge-fleet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`edge-fleet status | head`): stop quietly, as other tools do.
        # Python would complain again flushing stdout at exit, so point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    return code


if __name__ == "__main__":
    sys.exit(main())
