"""The simulation's own process: `python -m ember.pretrain.simulate.child` reads one request as JSON on stdin
(config YAML, world_size, rank, target, gpu_mem) and writes the result as one JSON line on stdout; a user error
is written as {"error": {"what", "where"}} with exit code 2."""

from __future__ import annotations

import json
import os
import sys

import yaml


def main() -> int:
    from ember.config import validate
    from ember.errors import UserError
    from ember.pretrain.simulate.rank import simulate_rank
    from ember.run_config import RunConfig

    request = json.loads(sys.stdin.read())
    try:
        cfg = validate(yaml.safe_load(request["config"]), RunConfig)
        result = simulate_rank(cfg, request["world_size"], request["rank"], request["target"], request.get("gpu_mem"))
    except UserError as e:
        print(json.dumps({"error": {"what": e.what, "where": e.where}}), flush=True)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # The fake process group holds no threads, but skip interpreter teardown of the patched torch all the same.
    os._exit(code)
