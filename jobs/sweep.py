"""Entry point for `ray job submit`: run (or resume) a Ray Tune sweep on the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/sweep.py conf/sweep/languages.yaml learner.gpus_per_rank=1

Under `ray job submit` RAY_ADDRESS points at the cluster, so the sweep's trials are scheduled
there; each trial reserves its whole run (driver + every role's bundles), which is the demand
the autoscaler scales the GPU worker group up for. Submitting the same command again after the
job died restores the sweep (`Tuner.restore`).
"""

import sys

from raykd.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
