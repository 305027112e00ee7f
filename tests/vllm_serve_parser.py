"""`vllm serve`'s own argument parser, wherever the installed vLLM keeps it."""

from __future__ import annotations

import argparse


def make_serve_parser() -> argparse.ArgumentParser:
    """The parser `vllm serve` builds (plugins registered before the call add their flags).

    ``make_arg_parser`` moved from ``vllm.entrypoints.launchers.cli_args`` (0.32) to
    ``vllm.entrypoints.common.cli_args`` (0.33).
    """
    try:
        from vllm.entrypoints.common.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
