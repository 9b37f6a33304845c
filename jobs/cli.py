"""The ``ray-ensemble`` command line.

Exit status: 0 on success, 2 on a usage or config error (message on stderr, no
traceback), 1 on a failure at run time.

    ray-ensemble score configs/example.yaml --input examples/data/reviews.jsonl --output out/
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its usage line
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ray-ensemble",
        description="Run an ensemble of Transformer models over text on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    score = sub.add_parser(
        "score",
        help="score a Parquet / CSV / JSONL dataset into Parquet",
        description="Score every input row with every member and write one Parquet row per "
        "input row: the input columns plus label, score, probs, agreement, entropy, "
        "probs__<member> and error.",
    )
    score.add_argument("config", help="ensemble config (YAML)")
    score.add_argument(
        "--input", required=True, help="a .parquet/.csv/.jsonl file or a directory of them"
    )
    score.add_argument("--output", required=True, help="directory for the scored Parquet files")
    score.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (env RAY_ADDRESS); default: start a local Ray instance",
    )
    score.add_argument(
        "--overwrite", action="store_true", help="replace the output directory if it is not empty"
    )
    score.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs for the local Ray instance (default: all); ignored with --address",
    )
    return parser


def _start_ray(address: str | None, num_cpus: int | None) -> bool:
    """Join ``address`` or start a local instance; True when we started Ray here."""
    import ray

    if ray.is_initialized():
        return False
    # Members' actors import the top-level packages; ship them when joining a cluster.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = (
        {"working_dir": root, "excludes": [".venv", ".git", "examples", "out"]} if address else None
    )
    started = time.perf_counter()
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    print(f"ray: ready in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return True


def _score(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.io import list_input_files
    from pipelines.offline import check_input, plan_ensemble, prepare_output, score

    # Everything a user can get wrong is checked before Ray starts.
    plan = plan_ensemble(load_config(args.config))
    list_input_files(args.input)
    check_input(plan, args.input)
    prepare_output(args.output, overwrite=args.overwrite)  # fails early on a non-empty dir
    started_ray = _start_ray(args.address, args.num_cpus)
    try:
        started = time.perf_counter()
        summary = score(plan, args.input, args.output, overwrite=args.overwrite)
        took = time.perf_counter() - started
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    rate = summary.rows / took if took > 0 else 0.0
    print(
        f"scored {summary.rows} rows ({summary.scored} ok, {summary.errors} with an error) "
        f"in {took:.1f}s ({rate:.0f} rows/s) -> {summary.output} ({summary.files} files)",
        file=sys.stderr,
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.config import ConfigError
    from pipelines.io import InputError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "score":
            return _score(args)
    except (ConfigError, InputError) as exc:
        print(f"ray-ensemble: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ray-ensemble: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a run-time failure: say what, keep the traceback for debugging
        import traceback

        traceback.print_exc()
        print(f"ray-ensemble: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
