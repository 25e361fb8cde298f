"""Run the `manu` flow in its own process (for the kill test): argv[1] = RunConfig as JSON."""

import json
import sys

from flows.pipeline import RunConfig, manu

if __name__ == "__main__":
    print("REPORT=" + manu(RunConfig(**json.loads(sys.argv[1]))), flush=True)
