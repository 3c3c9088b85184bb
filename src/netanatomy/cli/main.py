"""The `netanatomy` entry point: command discovery and the exit-code contract.

Exit 0 done; 2 bad input or usage (one line on stderr, no traceback); 1 a fault of ours
(one line, traceback only with NETANATOMY_DEBUG=1); 130 interrupted.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import traceback

import click

from .. import __version__
from ..errors import UsageError

PROG = "netanatomy"


class LazyGroup(click.Group):
    """Finds commands as modules of `netanatomy.cli.commands` that define `command`.

    Each command module is imported only when listed or invoked, so a new command is one new
    file and no shared registry to edit.
    """

    _package = "netanatomy.cli.commands"

    def _modules(self) -> dict[str, str]:
        pkg = importlib.import_module(self._package)
        names = {}
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                names[info.name.replace("_", "-")] = f"{self._package}.{info.name}"
        return names

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self._modules())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module_name = self._modules().get(cmd_name)
        if module_name is None:
            return None
        return importlib.import_module(module_name).command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name=PROG)
def cli() -> None:
    """netanatomy: the large-scale structure of neural networks.

    Models are named zoo:NAME, torchvision:NAME, timm:NAME or path/to/file.py:FACTORY.
    Every command takes --json for one JSON document on stdout; progress goes to stderr.
    """


def _fail(message: str, code: int) -> int:
    message = " ".join(str(message).split()) or "error"
    click.echo(f"{PROG}: error: {message}", err=True)
    return code


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code instead of exiting (used by tests and main)."""
    try:
        cli.main(args=argv, prog_name=PROG, standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except click.exceptions.NoArgsIsHelpError as exc:  # pragma: no cover - click >= 8.2
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        return 2
    except click.exceptions.UsageError as exc:
        hint = ""
        if exc.ctx is not None and exc.ctx.command_path:
            hint = f" (see '{exc.ctx.command_path} --help')"
        return _fail(f"{exc.format_message()}{hint}", 2)
    except click.exceptions.Abort:
        click.echo(f"{PROG}: interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo(f"{PROG}: interrupted", err=True)
        return 130
    except UsageError as exc:
        return _fail(str(exc), 2)
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a fault of ours
        if os.environ.get("NETANATOMY_DEBUG"):
            traceback.print_exc()
        return _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with NETANATOMY_DEBUG=1 for the traceback)", 1)


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":  # pragma: no cover
    main()
