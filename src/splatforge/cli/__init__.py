"""The ``splatforge`` command. Thin: each subcommand is a dataclass of its options (the library's
config dataclass where there is one, parsed by tyro, so every config field is an option), and
its ``main()`` calls library functions; the commands live in this package's modules by what they
work on. ``train`` applies its ``--preset`` before parsing, so any option given overrides the
preset and ``--help`` shows the preset's values. Logs and progress go to stderr
(:mod:`splatforge.cli.progress` draws the pipelines' events); stdout carries only results (JSON
summaries, listings)."""

from __future__ import annotations

import logging
import sys

import tyro
from rich.logging import RichHandler

from splatforge.cli.common import STDERR
from splatforge.cli.files import BackendsCommand, ExportCommand, PreviewCommand, ViewCommand
from splatforge.cli.geometry import DepthPriorCommand, MeshCommand, MeshEvalCommand
from splatforge.cli.jobs import BLOCKS, BlocksCommand, GenerateCommand, PrepareCommand, RunCommand, SplatterCommand
from splatforge.cli.service import ServeCommand, SubmitCommand
from splatforge.cli.train import DemoCommand, EvalCommand, RenderCommand, TrainCommand
from splatforge.errors import SplatforgeError

__all__ = ["COMMANDS", "main", "parse"]

COMMANDS = {
    "prepare": PrepareCommand,
    "train": TrainCommand,
    "render": RenderCommand,
    "eval": EvalCommand,
    "export": ExportCommand,
    "preview": PreviewCommand,
    "run": RunCommand,
    "view": ViewCommand,
    "generate": GenerateCommand,
    "splatter": SplatterCommand,
    "serve": ServeCommand,
    "submit": SubmitCommand,
    "demo": DemoCommand,
    "depth-prior": DepthPriorCommand,
    "mesh": MeshCommand,
    "mesh-eval": MeshEvalCommand,
    "blocks": BlocksCommand,
    "backends": BackendsCommand,
}


def parse(argv: list[str]):
    """The command object for ``argv`` (``[name, options...]``); exits with tyro's usage message
    on bad options, as any command line does."""
    if argv and argv[0] == "blocks":
        return tyro.extras.subcommand_cli_from_dict(BLOCKS, args=argv[1:], prog="splatforge blocks")
    if argv and argv[0] in COMMANDS:
        cls = COMMANDS[argv[0]]
        default = cls.defaults(argv[1:]) if hasattr(cls, "defaults") else None
        return tyro.cli(cls, args=argv[1:], default=default, prog=f"splatforge {argv[0]}")
    return tyro.extras.subcommand_cli_from_dict(COMMANDS, args=argv, prog="splatforge")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=STDERR, show_path=False)]
    )
    logging.getLogger("numba").setLevel(logging.WARNING)
    try:
        command = parse(argv)
        if isinstance(command, TrainCommand):
            command.argv = argv[1:]
        command.main()
    except SplatforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)  # one unwrapped line naming the file at fault
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
