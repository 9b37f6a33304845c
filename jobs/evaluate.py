"""Ray Job entry point for `ray-ensemble evaluate`; same arguments, same exit status.

    ray job submit --working-dir . -- python -m jobs.evaluate CONFIG ...

Inside a job it joins the job's cluster (RAY_ADDRESS, set by Ray), so no --address.
"""

from jobs.cli import run_job

if __name__ == "__main__":
    raise SystemExit(run_job("evaluate"))
