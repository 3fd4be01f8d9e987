"""`normswap` command line: thin dispatch to the module that owns each subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when
that subcommand runs, so `normswap --help` stays fast and needs no vLLM. Arguments after a bare ``--`` arrive
untouched in ``args.passthrough``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    # name: (module, one-line help)
    "serve": ("vllm_normswap.serve", "start the OpenAI-compatible vLLM server for one option"),
    "params": ("vllm_normswap.checkpoints.params", "parameter counts of the four options and the SwiGLU width rule"),
    "init": ("vllm_normswap.checkpoints.random_init", "write a randomly initialised checkpoint (tests, smoke runs)"),
    "quantize": ("vllm_normswap.checkpoints.quantize", "write an int8 weight-only (W8A16) checkpoint"),
    "convert": ("vllm_normswap.checkpoints.convert", "convert a GPT-2 / OPT / Llama checkpoint to NormSwap"),
    "zoo": ("vllm_normswap.checkpoints.zoo", "the embedded default models: build | path"),
    "ab": ("vllm_normswap.ab.run", "run the whole A/B and write the decision report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normswap", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name in sys.argv[1:2]:  # only the chosen subcommand imports its module
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough: list[str] = []
    if "--" in argv:  # everything after a bare -- goes untouched to the tool underneath (e.g. vLLM's server)
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    sys.argv[1:] = argv
    args = build_parser().parse_args(argv)
    args.passthrough = passthrough
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
