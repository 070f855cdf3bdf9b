"""cluster.yaml: valid for Ray's own autoscaler schema, dashboard on loopback, GPU workers
scaling from 0, and every config or script its comments name exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TEXT = (REPO / "cluster.yaml").read_text()
CLUSTER = yaml.safe_load(TEXT)


def test_valid_for_rays_autoscaler_schema_raw_and_with_defaults_filled():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(CLUSTER, json.loads(schema_path.read_text()))
    validate_config(prepare_config(CLUSTER))  # what `ray up` runs before it starts anything


def test_gpu_workers_scale_from_zero_and_the_head_holds_no_gpu():
    types = CLUSTER["available_node_types"]
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert gpu, "no GPU worker group"
    for t in gpu.values():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
    head = types[CLUSTER["head_node_type"]]
    assert not head["resources"].get("GPU") and head["max_workers"] == 0


def test_the_dashboard_listens_on_loopback_only():
    starts = " ".join(CLUSTER["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "0.0.0.0" not in TEXT
    assert "ray dashboard cluster.yaml" in TEXT  # the documented SSH tunnel


def test_commented_configs_and_scripts_exist():
    named = set(re.findall(r"\b((?:conf|jobs|raykd|tests)/[\w/.-]+\.(?:yaml|py))", TEXT))
    assert {"conf/quickstart.yaml", "conf/sweep/languages_hub.yaml", "jobs/sweep.py"} <= named
    missing = [p for p in sorted(named) if not (REPO / p).is_file()]
    assert not missing, missing
