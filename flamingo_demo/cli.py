"""`flamingo demo` (also `flamingo-demo`): grow a mini Flamingo end to end, offline. The library's `flamingo` command
hands `demo ARGS` to `main(ARGS)`."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from flamingo.runtime import quiet_transformers

from .run import ABLATIONS, SHOTS, DemoSettings
from .sizes import DEFAULT_SIZE, SIZES, duration


def build_parser(prog: Optional[str] = "flamingo demo") -> argparse.ArgumentParser:
    """The demo's options; `prog` names the command in usage lines (None: the program as invoked, argparse's)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Grow a mini Flamingo offline: world, backbones, training, few-shot eval, report.md.")
    parser.add_argument("--out", default="flamingo-demo",
                        help="output directory (stages an earlier run finished there are reused; a folder the demo "
                             "did not write is never replaced: the run is refused)")
    parser.add_argument("--size", default=DEFAULT_SIZE, choices=list(SIZES),
                        help=f"binding (the default): an LM grown long enough for induction heads, so few-shot binding "
                             f"works ({duration('binding')} on 2 cores); fast: the same without it "
                             f"({duration('fast')}); smoke: the test suite's ({duration('smoke')})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablate", default=None, choices=sorted(ABLATIONS),
                        help="also train + evaluate the Flamingo stage with one of the paper's ablations")
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS),
                        help=f"numbers of shots to evaluate at, each from 0 to {max(SHOTS)} (less on a size with "
                             "smaller demo pools)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--train-procs", type=int, default=0,
                        help="processes of the Flamingo stage (DDP, torchrun); 0: 2 on a machine with 2 cores or more")
    parser.add_argument("--eval-procs", type=int, default=0,
                        help="processes of the evaluation stage (torchrun, each with a share of every task's "
                             "queries); 0: 2 on a machine with 2 cores or more")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    # `flamingo demo` hands over its arguments; the `flamingo-demo` script reads sys.argv and is named as invoked
    parser = build_parser("flamingo demo" if argv is not None else None)
    args = parser.parse_args(argv)
    quiet_transformers(args.no_progress)
    try:
        from .demo import run_demo  # after parsing: the stages load torch and transformers, which --help needs not

        run_demo(DemoSettings(out=args.out, size=args.size, seed=args.seed, ablate=args.ablate,
                              shots=tuple(args.shots), progress=not args.no_progress, train_procs=args.train_procs,
                              eval_procs=args.eval_procs))
    except KeyboardInterrupt:  # Ctrl-C, also while a stage's processes ran (demo.run_processes)
        print(f"\n{parser.prog}: interrupted; rerun the same command to continue (finished stages are reused)",
              file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:  # a refused setting, a failed stage, an unwritable --out
        print(f"{parser.prog}: error: {e}", file=sys.stderr)  # as argparse's own errors name it
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
