"""Run by tests/ldm/test_secrets.py in a fresh process: what a Ray job started by ensure_ray ships and sees.

`python -m tests.ldm.ray_env_probe WORKDIR [--set A=B ...]` starts (or, with RAY_ADDRESS set, attaches
to) a cluster through ensure_ray and prints one JSON line: the job's runtime_env, the values a task
sees for the variables named in LDM_PROBE_VARS, and the cluster's address. With LDM_PROBE_ATTACH set,
it then runs that command line as a second driver attached to this cluster and adds its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def main(argv: list[str]) -> None:
    """Print what this driver's job ships to the cluster and what a task sees."""
    import ray

    from ldm.ray_cluster import ensure_ray
    from tests.helpers import make_config

    workdir, overrides = argv[0], [a for a in argv[1:] if a != "--set"]
    ensure_ray(make_config(workdir, *overrides))
    names = os.environ["LDM_PROBE_VARS"].split(",")

    @ray.remote(num_cpus=0)
    def task_env() -> dict:
        return {k: os.environ.get(k) for k in names}

    out = {
        "runtime_env": ray.get_runtime_context().runtime_env,
        "task_env": ray.get(task_env.remote()),
        "address": ray.get_runtime_context().gcs_address,
    }
    attach = os.environ.pop("LDM_PROBE_ATTACH", None)
    if attach:
        env = {**os.environ, "RAY_ADDRESS": out["address"]}
        done = subprocess.run(json.loads(attach), env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        out["attached"] = json.loads(done.stdout.strip().splitlines()[-1])
    ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
