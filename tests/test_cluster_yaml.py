"""cluster.yaml against Ray's own cluster-launcher validation, and broken copies of it that must fail.

`prepare_config` fills in the AWS provider's defaults (it reads ray/autoscaler/aws/defaults.yaml and does
not import boto3, which is not installed here) and `validate_config` checks the result against Ray's
JSON schema plus its cross-field rules; `AutoscalingConfig` is how the v2 autoscaler reads node types.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


def load_and_validate(path: Path) -> dict[str, Any]:
    """What `ray up` does before it talks to the cloud: fill defaults, then validate."""
    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load_and_validate(CLUSTER_YAML)


def test_cluster_yaml_passes_rays_validator_without_boto3(config: dict[str, Any]) -> None:
    assert config["provider"]["type"] == "aws"
    # The validation path needs no cloud SDK: it runs on a laptop or CI machine without boto3.
    assert "boto3" not in sys.modules


def test_head_is_a_cpu_node_that_runs_no_trial_work(config: dict[str, Any]) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    # CPU 0: no fold or ensemble task lands on the head; no GPU key either. Its "coordinator" resource is
    # the trial coordinators' home (below).
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]
    assert head["node_config"]["InstanceType"].startswith(("m", "c", "r"))
    # prepare_config sets the head type's own max_workers to 0 (the head is never scaled).
    assert head["max_workers"] == 0


def test_gpu_workers_scale_from_zero_spot_first_with_on_demand_fallback(config: dict[str, Any]) -> None:
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers, "expected at least one worker node type"
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name
        assert node_type["resources"].get("GPU", 0) >= 1, name
    market = {n: t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") for n, t in workers.items()}
    spot = [n for n, m in market.items() if m == "spot"]
    on_demand = [n for n, m in market.items() if m is None]
    assert len(spot) == 1 and len(on_demand) == 1, (spot, on_demand)

    # The v2 autoscaler (enabled on the head) reads `priority` per node type: spot must rank first.
    node_types = AutoscalingConfig(config, skip_content_hash=True).get_node_type_configs()
    assert node_types[spot[0]].priority > node_types[on_demand[0]].priority
    assert node_types[spot[0]].resources == node_types[on_demand[0]].resources
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_enable_autoscaler_v2=1" in head_start


def test_coordinators_live_on_the_on_demand_head_not_on_spot_nodes(config: dict[str, Any]) -> None:
    from search.config import load_sweep_config
    from trainables.trial import trial_resources

    example = load_sweep_config(ROOT / "configs" / "cluster_example.yaml", check_data=False)
    name = example.resources.coordinator_resource
    assert name == "coordinator"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]  # on demand: spot reclaim never takes it
    # One unit per concurrent trial, only on the head: no worker type (spot or on demand) advertises it.
    assert head["resources"][name] >= example.search.max_concurrent_trials
    assert all(name not in t["resources"] for n, t in types.items() if n != config["head_node_type"])
    coordinator, *folds = trial_resources(example.data.num_folds, example.resources).bundles
    # The coordinator bundle fits the head (CPU 0) and fits no GPU worker; every fold bundle fits a GPU worker
    # and not the head.
    fits = lambda bundle, res: all(res.get(k, 0) >= v for k, v in bundle.items())  # noqa: E731
    assert fits(coordinator, head["resources"])
    assert not any(fits(coordinator, t["resources"]) for n, t in types.items() if n != config["head_node_type"])
    assert folds and all(not fits(f, head["resources"]) for f in folds)
    assert all(fits(f, types["gpu.spot"]["resources"]) for f in folds)


def test_dashboard_on_head_loopback_and_idle_timeout(config: dict[str, Any]) -> None:
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    assert 0 < config["idle_timeout_minutes"] <= 60


def test_setup_installs_the_mounted_project_with_its_constraints(config: dict[str, Any]) -> None:
    mounts = config["file_mounts"]
    remote_project = next(remote for remote, local in mounts.items() if Path(local) == Path("."))
    setup = " ".join(config["setup_commands"])
    assert f"pip install -q -c {remote_project}/constraints.txt {remote_project}" in setup
    # What the setup command installs must exist in the project that is mounted.
    assert (ROOT / "pyproject.toml").is_file()
    assert (ROOT / "constraints.txt").is_file()
    assert any(Path(local) == Path("./data") for local in mounts.values())
    assert any("boto3" in c for c in config["head_setup_commands"])


def test_every_node_mounts_the_shared_storage_that_the_cluster_sweep_uses(config: dict[str, Any]) -> None:
    # Tune writes checkpoints from the worker nodes and trials read split.json: storage must be shared.
    mounts = re.findall(r"sudo mount -t nfs4 -o \S+ \S+ (/\S+)", " ".join(config["setup_commands"]))
    assert mounts == ["/mnt/shared"], config["setup_commands"]
    example = yaml.safe_load((ROOT / "configs" / "cluster_example.yaml").read_text())
    assert Path(example["storage"]).is_relative_to(mounts[0])
    assert Path(example["data"]["path"]).is_relative_to(mounts[0])
    assert "--storage /mnt/shared/" in CLUSTER_YAML.read_text()


def test_no_credentials_in_the_file() -> None:
    text = CLUSTER_YAML.read_text()
    for pattern in (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key", r"aws_access_key_id", r"BEGIN [A-Z ]*PRIVATE KEY"):
        assert re.search(pattern, text, flags=re.IGNORECASE) is None, pattern
    raw = yaml.safe_load(text)
    # `ray up` makes the SSH key pair itself; the nodes get cloud access from instance profiles only.
    assert "ssh_private_key" not in raw["auth"]
    for name, node_type in raw["available_node_types"].items():
        assert "KeyName" not in node_type["node_config"], name
        assert "IamInstanceProfile" in node_type["node_config"], f"{name} gets no IAM instance profile"


def _drop_worker_node_config(c: dict[str, Any]) -> None:
    del c["available_node_types"]["gpu.spot"]["node_config"]


def _max_workers_as_string(c: dict[str, Any]) -> None:
    c["max_workers"] = "eight"


def _fractional_gpu_resource(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu.spot"]["resources"]["GPU"] = 0.5  # node resources are integers


def _unknown_top_level_key(c: dict[str, Any]) -> None:
    c["idle_timeout_minute"] = 5  # a typo of idle_timeout_minutes


def _head_type_not_defined(c: dict[str, Any]) -> None:
    c["head_node_type"] = "head.gpu"


def _min_workers_above_max_workers(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu.spot"]["min_workers"] = c["max_workers"]
    c["available_node_types"]["gpu.ondemand"]["min_workers"] = 1  # max_workers + 1 > max_workers


@pytest.mark.parametrize(
    ("breakage", "error", "match"),
    [
        (_drop_worker_node_config, jsonschema.ValidationError, "'node_config' is a required property"),
        (_max_workers_as_string, jsonschema.ValidationError, "'eight' is not of type 'integer'"),
        (_fractional_gpu_resource, jsonschema.ValidationError, "0.5 is not of type 'integer'"),
        (_unknown_top_level_key, jsonschema.ValidationError, "'idle_timeout_minute' was unexpected"),
        (_head_type_not_defined, ValueError, "`head_node_type` must be one of"),
        (_min_workers_above_max_workers, ValueError, "global `max_workers` is smaller than the sum"),
    ],
    ids=lambda v: getattr(v, "__name__", "").lstrip("_") if callable(v) else None,
)
def test_broken_copy_fails_validation(tmp_path: Path, breakage, error, match) -> None:
    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    broken = copy.deepcopy(raw)
    breakage(broken)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(error, match=re.escape(match)):
        load_and_validate(path)
