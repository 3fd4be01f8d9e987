"""`normswap` command line: thin dispatch to the module that owns each subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when
that subcommand runs, so `normswap --help` stays fast and needs no vLLM. Arguments after a bare ``--`` arrive
untouched in ``args.passthrough``.

Exit codes: 0 success; 1 the command failed (a message on stderr); 2 bad command-line arguments (argparse);
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vllm_normswap.registry import OPTIONS

DESCRIPTION = f"""\
Does swapping the pre-FFN LayerNorm for RMSNorm, and/or the FFN's GELU for SwiGLU, remove the activation outliers
that make int8 weight-only quantization hurt quality, without losing throughput? normswap answers that for your
model and your traffic, inside vLLM: serve any of the options, bf16 or int8 weight-only, with per-layer outlier
counters on /metrics, and run the whole A/B to a decision report.

option ids (pre-FFN norm + FFN activation):
{chr(10).join(f"  {o.id:<12} {o.norm_type} + {o.ffn_act}: {o.change}" for o in OPTIONS.values())}
"""

EPILOG = """\
examples:
  normswap serve rms-swiglu                      serve the embedded zoo model on 127.0.0.1:8000
  normswap serve ln-gelu --print-config          the serving config YAML it uses
  normswap ab                                    the whole A/B on the embedded models -> runs/<timestamp>/report.html
  normswap COMMAND --help                        a command's flags, with their defaults
"""

SUBCOMMANDS = {
    # name: (module, one-line help)
    "serve": ("vllm_normswap.serve", "start the OpenAI-compatible vLLM server for one option"),
    "params": ("vllm_normswap.checkpoints.params", "parameter counts of the four options and the SwiGLU width rule"),
    "init": ("vllm_normswap.checkpoints.random_init", "write a randomly initialised checkpoint (tests, smoke runs)"),
    "quantize": ("vllm_normswap.checkpoints.quantize", "write an int8 weight-only (W8A16) checkpoint"),
    "convert": ("vllm_normswap.checkpoints.convert", "convert a GPT-2 / OPT / Llama checkpoint to NormSwap"),
    "zoo": ("vllm_normswap.checkpoints.zoo", "the embedded default models: build | path"),
    "plant": ("vllm_normswap.checkpoints.plant", "copy a checkpoint with planted int8-breaking FFN outliers "
                                                  "(the A/B's positive control)"),
    "swap": ("vllm_normswap.checkpoints.swap", "write an initialised checkpoint of another option from a trained one"),
    "heal": ("vllm_normswap.checkpoints.heal", "distil a swapped checkpoint back to its teacher (transformers "
                                                "Trainer)"),
    "ab": ("vllm_normswap.ab.run", "run the whole A/B and write the decision report"),
    "int8-plan": ("vllm_normswap.quant.plan_cmd", "the CPU int8 kernel per layer shape and batch size, measured here"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag's help (as vLLM's and pip's own help do); descriptions keep their lines."""


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("vllm-normswap")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        from vllm_normswap import __version__

        return __version__


def _formatted(parser: argparse.ArgumentParser) -> None:
    """The formatter for every parser below this one too (subcommands that add their own sub-subcommands)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _formatted(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normswap", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print the installed vllm-normswap version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        if name in sys.argv[1:2]:  # only the chosen subcommand imports its module
            importlib.import_module(module).add_arguments(p)
            _formatted(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough: list[str] = []
    if "--" in argv:  # everything after a bare -- goes untouched to the tool underneath (e.g. vLLM's server)
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    sys.argv[1:] = argv
    if argv[:1] != ["serve"]:
        # stdout is for a command's JSON: vLLM's log handler (vllm/logger.py) writes to VLLM_LOGGING_STREAM,
        # stdout by default, once anything in the command configures vLLM's logging. `serve` keeps vLLM's default.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    args = build_parser().parse_args(argv)
    args.passthrough = passthrough
    from vllm_normswap.registry import ConfigError

    try:
        rc = importlib.import_module(args._module).run(args)
    except KeyboardInterrupt:
        print("normswap: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError) as err:  # a user-fixable problem: the message, not a traceback
        print(f"normswap {args.command}: error: {err}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
