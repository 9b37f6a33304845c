"""A 300,000-row job from `s3://` to `s3://`, its driver killed at about 40%, then resumed.

    python bench/s3_resume.py --rows 300000

The S3 server is moto's standalone server on a loopback port, started here; the job is
`ray-ensemble score` as a user runs it, with `AWS_ENDPOINT_URL` pointing at that server,
the input and the three tiny members of `configs/example.yaml` on S3. "40%" is observed:
the kill (SIGKILL to the driver and every process it started) comes once the committed
parts hold 40% of the rows, read from their footers on S3. The resumed job must end 0
with every input id exactly once, in input order.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET = "bench"
MEMBERS = ("alpha", "beta", "gamma")


def main() -> None:
    from moto.server import ThreadedMotoServer

    from bench.faults import committed_rows
    from jobs.example import make_texts, write_example
    from pipelines.output import read_output

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--at", type=float, default=0.4, help="kill once this share is committed")
    parser.add_argument("--rows-per-file", type=int, default=20_000)
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-s3-bench")
    )
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_example(work / "examples")
    with open(work / "in.jsonl", "w") as f:
        for i, text in enumerate(make_texts(args.rows, seed=7, max_words=60)):
            f.write(json.dumps({"id": f"r{i}", "text": text}) + "\n")
    config = (ROOT / "configs" / "example.yaml").read_text()
    for name in MEMBERS:
        config = config.replace(f"../examples/models/{name}", f"s3://{BUCKET}/models/{name}")
    (work / "s3.yaml").write_text(config)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_ENSEMBLE_MODEL_CACHE": str(work / "model-cache"),
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
    }
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                          "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})  # fmt: skip
    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    for name in MEMBERS:
        pafs.copy_files(
            str(work / "examples" / "models" / name),
            f"{BUCKET}/models/{name}",
            destination_filesystem=fs,
        )
    pafs.copy_files(str(work / "in.jsonl"), f"{BUCKET}/in/in.jsonl", destination_filesystem=fs)
    out = f"s3://{BUCKET}/out"
    cmd = [
        sys.executable, "-m", "jobs.cli", "score", str(work / "s3.yaml"),
        "--input", f"s3://{BUCKET}/in/in.jsonl", "--output", out,
        "--num-cpus", str(os.cpu_count()), "--rows-per-file", str(args.rows_per_file),
    ]  # fmt: skip
    at = int(args.rows * args.at)
    began = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=open(work / "first.log", "w"), start_new_session=True,
    )  # fmt: skip
    while committed_rows(out) < at:
        if proc.poll() is not None:
            sys.exit(f"the job ended (rc {proc.returncode}) before {at} rows were committed")
        time.sleep(0.5)
    killed_at = time.monotonic() - began
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=30)
    proc.wait()
    committed = committed_rows(out)
    resumed_began = time.monotonic()
    resume = subprocess.run(
        [*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True
    )  # fmt: skip
    result = {
        "rows": args.rows,
        "killed_at_s": round(killed_at, 1),
        "processes_killed": len(tree),
        "committed_at_kill": committed,
        "resume_exit": resume.returncode,
        "resume_wall_s": round(time.monotonic() - resumed_began, 1),
        "summary": resume.stderr.strip().splitlines()[-1] if resume.stderr.strip() else "",
    }
    if resume.returncode == 0:
        ids = read_output(out).column("id").to_pylist()
        result.update(
            output_rows=len(ids),
            unique_ids=len(set(ids)),
            in_input_order=ids == [f"r{i}" for i in range(args.rows)],
        )
    print(json.dumps(result, indent=1), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
