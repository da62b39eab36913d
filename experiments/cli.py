"""Command-line pieces every experiment tool shares: KEY=VALUE options, the help layout, short usage errors,
device and threads.

The studies (`experiments.study`), the evaluation (`experiments.evaluation`) and the benchmarks
(`experiments.bench`) import these from here, so no tool depends on another tool's module.
"""
from __future__ import annotations

import argparse
import ast
from typing import Any, NoReturn

import torch


def model_kwarg(text: str) -> tuple[str, Any]:
    """argparse type: 'KEY=VALUE' -> (KEY, VALUE parsed as a Python literal when it is one, else the string)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


class UsageError(Exception):
    """A mistake in the command line or in what it points at: the tools print the message alone and exit 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the description's own layout; add '(default: X)' to options with a default their help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        unset = d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d)
        if not unset and "default" not in text:  # 0 and 0.0 are defaults to show (0 == False, but not `is`)
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with two-line errors: the usage line names --help instead of listing every option."""

    def error(self, message: str) -> NoReturn:
        """Print 'usage: PROG [options] (see --help)' and 'PROG: error: MESSAGE' on stderr; exit 2."""
        self.exit(2, f"usage: {self.prog} [options] (see --help)\n{self.prog}: error: {message}\n")


def add_device_options(group: Any, default: str = "auto") -> None:
    """Add --device (auto, cpu, cuda, cuda:N) and --threads to a parser or an argument group."""
    group.add_argument("--device", default=default, metavar="DEVICE",
                       help="auto (cuda when available), cpu, cuda or cuda:N")
    group.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")


def resolve_device(name: str) -> torch.device:
    """--device value -> torch.device: 'auto' is cuda when available, else cpu; asking for absent CUDA exits."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (torch.cuda.is_available() "
                         "is False); pass --device cpu")
    return device


def set_threads(threads: int | None) -> None:
    """torch.set_num_threads(threads) when given (None or 0: leave torch's choice)."""
    if threads:
        torch.set_num_threads(threads)
