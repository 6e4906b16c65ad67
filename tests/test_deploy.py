"""Kubernetes and Argo Workflows: what the GPU presets compile to, checked offline.

`argo-workflows create --only-json` needs an S3 datastore for the code package: the moto server
on 127.0.0.1 stands in for it. Nothing reaches a cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, python_env, run_bounded

sys.path.insert(0, str(REPO / "flows"))  # the flow's own modules, as the flow imports them

from kubernetes_settings import KubernetesSettingsError, settings_for  # noqa: E402

FLOW = REPO / "flows" / "dolly_flow.py"
IMAGE = "registry.example.com/ml/metaflow-dolly-gpu:cu126-torch2.13"


def preset_with_image(name: str, tmp_path: Path) -> Path:
    """A GPU preset as a user has it once the image is built and pushed."""
    config = json.loads((REPO / "flows" / "configs" / f"{name}.json").read_text())
    config["kubernetes"]["image"] = IMAGE
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def argo_json(config: Path, s3_env: dict, bucket: str, cwd: Path, *extra: str,
              flow: Path = FLOW) -> subprocess.CompletedProcess:
    env = python_env(**s3_env, METAFLOW_DEFAULT_DATASTORE="s3", METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{bucket}/metaflow",
                     METAFLOW_DEFAULT_METADATA="local", USERNAME="tester")
    return run_bounded([sys.executable, str(flow), "--config", "config", str(config), *extra, "argo-workflows",
                        "create", "--only-json"], cwd=cwd, env=env, timeout=300)


def templates(output: str) -> dict[str, dict]:
    workflow = json.loads(output[output.index("{"):])
    assert workflow["kind"] == "WorkflowTemplate"
    return {t["name"]: t for t in workflow["spec"]["templates"] if "container" in t}


def test_a100x4_preset_compiles_to_four_gpus_shm_image_node_pool_and_retries(s3_env, s3_bucket_name, tmp_path):
    result = argo_json(preset_with_image("a100x4", tmp_path), s3_env, s3_bucket_name, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = templates(result.stdout)
    train = steps["train"]
    container = train["container"]
    preset = json.loads((REPO / "flows" / "configs" / "a100x4.json").read_text())
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(preset["resources"]["gpu"])
    requests = container["resources"]["requests"]
    assert float(requests["cpu"]) == preset["resources"]["cpu"]
    assert float(requests["memory"].removesuffix("M")) == preset["resources"]["memory"]  # in MB
    # /dev/shm: a memory-backed volume of the preset's size, mounted in the train container
    shm = [v for v in train["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"
           and v["emptyDir"].get("sizeLimit")]
    assert [v["emptyDir"]["sizeLimit"] for v in shm] == ["32768Mi"]
    assert any(m["name"] == shm[0]["name"] and m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    assert container["image"] == IMAGE
    assert train["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in train["tolerations"]
    assert train["retryStrategy"]["limit"] == preset["retries"]
    # start and end check data and write the summary: same image, no GPU, no GPU node pool
    for name in ("start", "end"):
        assert steps[name]["container"]["image"] == IMAGE
        assert "nvidia.com/gpu" not in steps[name]["container"]["resources"]["limits"]
        assert not steps[name].get("nodeSelector")
        # Metaflow's defaults, not the preset's: the train step's figures came from the preset.
        assert (steps[name]["container"]["resources"]["requests"]["cpu"],
                "retryStrategy" in steps[name]) == ("1", False)


@pytest.mark.parametrize(("preset", "peft", "node_pool"), [
    ("a10x1-qlora", "qlora", "NVIDIA-A10"),
    ("a100x1-lora", "lora", "NVIDIA-A100-SXM4-80GB"),
])
def test_single_gpu_adapter_presets_compile_to_one_gpu_and_their_peft(preset, peft, node_pool, s3_env,
                                                                      s3_bucket_name, tmp_path):
    result = argo_json(preset_with_image(preset, tmp_path), s3_env, s3_bucket_name, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    train = templates(result.stdout)["train"]
    container = train["container"]
    config = json.loads((REPO / "flows" / "configs" / f"{preset}.json").read_text())
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" == str(config["resources"]["gpu"])
    requests = container["resources"]["requests"]
    assert float(requests["cpu"]) == config["resources"]["cpu"]
    assert float(requests["memory"].removesuffix("M")) == config["resources"]["memory"]
    # Room on the node's disk for the 16 GB base model download, checkpoints and the output.
    assert float(requests["ephemeral-storage"].removesuffix("M")) == config["kubernetes"]["train"]["disk"]
    assert container["image"] == IMAGE
    assert train["nodeSelector"] == {"nvidia.com/gpu.product": node_pool}
    assert train["retryStrategy"]["limit"] == config["retries"]
    # One GPU: no NCCL between GPUs, so no /dev/shm volume beyond the container's default.
    assert not [v for v in train.get("volumes", []) if v.get("emptyDir", {}).get("sizeLimit")]
    # The trainer's flags are built in start; what the deployment fixes is the flow parameters'
    # defaults: --peft from the preset, and no DeepSpeed.
    workflow = json.loads(result.stdout[result.stdout.index("{"):])
    defaults = {p["name"]: p.get("value") for p in workflow["spec"]["arguments"]["parameters"]}
    assert json.loads(defaults["peft"]) == peft
    assert json.loads(defaults["deepspeed-config"]) == ""


def test_command_line_image_wins_over_the_config(s3_env, s3_bucket_name, tmp_path):
    other = "registry.example.com/ml/dolly-debug:1"
    config = REPO / "flows" / "configs" / "a10x1.json"  # the placeholder image: overridden here
    result = argo_json(config, s3_env, s3_bucket_name, tmp_path, "--with", f"kubernetes:image={other}")
    assert result.returncode == 0, result.stderr[-3000:]
    train = templates(result.stdout)["train"]
    assert train["container"]["image"] == other
    assert train["container"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert train["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10"}


def test_placeholder_image_stops_the_deploy_with_the_fix(s3_env, s3_bucket_name, tmp_path):
    result = argo_json(REPO / "flows" / "configs" / "v100x8.json", s3_env, s3_bucket_name, tmp_path)
    assert result.returncode != 0
    assert "kubernetes.image is the placeholder" in result.stderr
    assert "environments/Dockerfile.gpu" in result.stderr and "Traceback" not in result.stderr


def test_settings_fill_defaults_only_and_reject_unknown_keys():
    defaults = {"image": None, "node_selector": None, "tolerations": None}
    chosen = settings_for({"image": IMAGE, "node_selector": {"a": "b"}}, {"image": "mine:1", "node_selector": None},
                          defaults)
    assert chosen == {"node_selector": {"a": "b"}}  # the command line's image stays
    with pytest.raises(KubernetesSettingsError, match="unknown key.*gpus.*resources"):
        settings_for({"gpus": 4}, {}, defaults)


def test_without_kubernetes_the_section_is_ignored(tmp_path):
    # A GPU workstation runs the preset locally: the placeholder image must not get in the way.
    result = subprocess.run([sys.executable, str(FLOW), "--config", "config",
                             str(REPO / "flows" / "configs" / "a100x4.json"),
                             "show"], cwd=tmp_path, env=python_env(USERNAME="tester"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Step train" in result.stdout and "placeholder" not in result.stderr
