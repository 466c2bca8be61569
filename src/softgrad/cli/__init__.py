"""The ``softgrad`` command line.

Each subcommand lives in its own module and is imported only when it runs, so that
``softgrad explain`` does not pay for importing scikit-learn or PyTorch.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

# name -> (module, attribute) of a click.Command
_SUBCOMMANDS = {
    "explain": ("softgrad.cli._explain", "explain"),
    "check": ("softgrad.cli._check", "check"),
    "train": ("softgrad.cli._train", "train"),
    "predict": ("softgrad.cli._predict", "predict"),
    "bench": ("softgrad.cli._bench", "bench"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, (module, _) in _SUBCOMMANDS.items() if _module_exists(module))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _SUBCOMMANDS or not _module_exists(_SUBCOMMANDS[cmd_name][0]):
            return None
        module, attribute = _SUBCOMMANDS[cmd_name]
        return getattr(importlib.import_module(module), attribute)


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="softgrad")
def main() -> None:
    """softgrad: softmax, its losses and their gradients, verified and fast."""
