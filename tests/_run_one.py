"""Run one toy run in a fresh process (used by the resume test to kill a run for real)."""
import json
import sys

import conftest  # noqa: F401 - environment, plugin path, micro model
from benchmark.engine import Engine

results_dir, method, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
r = Engine(results_dir).run(conftest.toy_cfg(method, shots=4, sets=sets))
print(json.dumps(r["metrics"]))
