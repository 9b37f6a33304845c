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


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (env RAY_ADDRESS); default: start a local Ray instance",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs for the local Ray instance (default: all); ignored with --address",
    )


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
        "--overwrite", action="store_true", help="replace the output directory if it is not empty"
    )
    _add_ray_arguments(score)
    serve_cmd = sub.add_parser(
        "serve",
        help="serve the ensemble over HTTP (Ray Serve)",
        description="Serve POST /v1/predict, GET /healthz and GET /v1/ensemble until Ctrl-C "
        "or SIGTERM. Limits and batching come from the config's serve: block.",
    )
    serve_cmd.add_argument("config", help="ensemble config (YAML)")
    serve_cmd.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    serve_cmd.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    _add_ray_arguments(serve_cmd)
    serve_config = sub.add_parser(
        "serve-config",
        help="print a Serve config file for `serve deploy` / `serve run`",
        description="Print a Ray Serve config (YAML) that runs this ensemble with "
        "`serve deploy serve.yaml` on a cluster or `serve run serve.yaml` locally.",
    )
    serve_config.add_argument("config", help="ensemble config (YAML)")
    serve_config.add_argument("--host", default="127.0.0.1", help="address the proxy binds")
    serve_config.add_argument("--port", type=int, default=8000, help="port the proxy binds")
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
    from pipelines.offline import check_input, plan_ensemble, prepare_output, score

    # Everything a user can get wrong is checked before Ray starts.
    plan = plan_ensemble(load_config(args.config))
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


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pipelines.config import load_config
    from pipelines.offline import plan_ensemble

    plan = plan_ensemble(load_config(args.config))
    if not 0 < args.port < 65536:
        print(f"ray-ensemble: error: --port {args.port} is not a port number", file=sys.stderr)
        return EXIT_USAGE
    started_ray = _start_ray(args.address, args.num_cpus)
    from ray import serve

    from pipelines.online import build_app

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(
            http_options={
                "host": args.host,
                "port": args.port,
                "request_timeout_s": plan.config.serve.request_timeout_s + 5,
            }
        )
        serve.run(build_app(plan), name=plan.config.name, route_prefix="/")
        print(
            f"serving '{plan.config.name}' on http://{args.host}:{args.port} "
            "(POST /v1/predict, GET /healthz, GET /v1/ensemble, docs at /docs); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print("ray-ensemble: shutting down", file=sys.stderr, flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    return EXIT_OK


def _serve_config(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from pipelines.config import load_config

    cfg = load_config(args.config)  # refuse a broken config here, not on the cluster
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {
            "host": args.host,
            "port": args.port,
            "request_timeout_s": cfg.serve.request_timeout_s + 5,
        },
        "applications": [
            {
                "name": cfg.name,
                "route_prefix": "/",
                "import_path": "pipelines.online:app_builder",
                "args": {"config": os.path.relpath(Path(args.config).resolve(), Path.cwd())},
            }
        ],
    }
    print("# Ray Serve config for ray-ensemble; run from this project's folder:")
    print("#   serve run serve.yaml        (local)   |   serve deploy serve.yaml   (cluster)")
    print(yaml.safe_dump(doc, sort_keys=False), end="")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.config import ConfigError
    from pipelines.io import InputError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "score":
            return _score(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "serve-config":
            return _serve_config(args)
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
