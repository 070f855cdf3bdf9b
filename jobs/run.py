"""Entry point for `ray job submit`: run a pipeline on the cluster the job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run.py conf/quickstart.yaml learner.lr=1e-5

Under `ray job submit` the RAY_ADDRESS environment variable points at the cluster, so the
pipeline joins it instead of starting an embedded node.
"""

import sys

from raykd.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
