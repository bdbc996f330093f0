"""The model server on Ray Serve: a two-node cluster on this machine, one HTTP endpoint, scaling up and down.

Ray binds some of its services to the host's interface address, so the cluster runs inside a
network namespace of its own with only the loopback interface (``unshare -rn``), and a PID
namespace (``-p --fork --mount-proc``): when the script ends, the kernel ends every Ray process
it started. Where namespaces are not permitted, the test skips and says so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("ray_cluster.py")
RUN_LIMIT_S = 420  # the whole cluster run ends within this (about 100 s here under load; the sum of its phases' bounds)
EMBEDDING_ATOL = 1e-5  # one text embedded through three protocols' codecs: the same float32 numbers, printed by two encoders


def _namespace_command() -> list[str]:
    base = ["unshare", "-rnp", "--fork", "--mount-proc"]
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare or ip (util-linux, iproute2) is not installed: the Ray cluster would bind to the host's interfaces")
    probe = subprocess.run([*base, "ip", "link", "set", "lo", "up"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"network and PID namespaces are not permitted here ({probe.stderr.strip()}): the Ray test needs them")
    return base


@pytest.mark.slow
def test_serve_backend_ray_two_nodes_one_endpoint_scale_up_and_down_with_a_rollout():
    """`modelpress serve --backend ray` on a two-node cluster: protocols, autoscaling across nodes, a rollout, Ctrl-C."""
    pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'modelpress[ray]'")
    ns = _namespace_command()
    spec = json.dumps({"port": 8123, "rollout": True})
    shell = f'ip link set lo up && exec "{sys.executable}" "{SCRIPT}" \'{spec}\''
    proc = subprocess.run([*ns, "sh", "-c", shell], capture_output=True, text=True, timeout=RUN_LIMIT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(out["timings"]))

    # one ingress application and one per model version
    assert out["applications"] == ["modelpress", "modelpress.minilm.v1"]

    # KServe v2, OpenAI and SageMaker answer through the one endpoint with the same embedding
    protocols = out["protocols"]
    assert all(status == 200 for status, _ in protocols.values()), protocols
    kv, oa = np.asarray(protocols["kserve_v2"][1]), np.asarray(protocols["openai"][1])
    sm = np.asarray(protocols["sagemaker"][1])
    np.testing.assert_allclose(kv, oa, atol=EMBEDDING_ATOL)
    np.testing.assert_allclose(kv, sm, atol=EMBEDDING_ATOL)
    # a bad input is answered by the ingress with the server's own 400
    assert out["bad_input"][0] == 400 and "string" in out["bad_input"][1]

    # under load a second replica starts, on the other node, and both nodes answer
    assert out["replicas_before"] == 1
    assert out["scale_up"]["peak_replicas"] == 2, out["scale_up"]
    assert set(out["answered_by_node"]) == set(out["nodes"]), (out["answered_by_node"], out["nodes"])
    assert len(out["nodes"]) == 2
    # idle, it scales back down to min_replicas
    assert out["scale_down"]["replicas"] == 1, out["scale_down"]

    # a rollout's candidate is deployed as its own application, the split sends traffic to both, the abort retires it
    ro = out["rollout"]
    assert ro["start"][0] == 201 and ro["status"] == "running", ro
    assert set(ro["versions_answered"]) == {"1", "2"}, ro
    assert ro["abort"] == 200 and ro["served_after_abort"] == ["1"], ro
    assert out["applications_after_rollout"] == ["modelpress", "modelpress.minilm.v1"]
    # shadow, then canary 50% -> 100%, decided by the controller in the Ray ingress: the candidate ends serving all
    can = out["canary"]
    assert can["start"][0] == 201, can
    assert can["status"] == "succeeded", can
    assert can["answered_after"] == ["2"], can

    # SIGTERM (Ctrl-C) ends `modelpress serve --backend ray` cleanly and deletes its applications
    assert out["serve_exit"] == 0, out["serve_log"]
    assert out["applications_after_exit"] == []


# -- fast: options, the mapping to Ray's settings, errors ---------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "ray", "--max-replicas", "0"], "max_replicas: Input should be greater than or equal to 1"),
        (["--backend", "ray", "--min-replicas", "3", "--max-replicas", "2"], "min_replicas (3) is above max_replicas (2)"),
        (["--backend", "ray", "--downscale-delay", "soon"], "--downscale-delay 'soon' is not a duration"),
        (["--backend", "kubernetes"], "'kubernetes' is not a serving backend"),
        (["--max-replicas", "4"], "(--max-replicas) apply to --backend ray only"),
    ],
)
def test_bad_serve_options_fail_before_anything_starts(args, message):
    from typer.testing import CliRunner

    from modelpress.cli import app

    res = CliRunner().invoke(app, ["serve", "minilm", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "hint:" in res.output and "Traceback" not in res.output


def test_options_map_to_ray_deployment_settings():
    from modelpress.scaleout.ray_serve import RayOptions
    from modelpress.serving.config import ModelConfig

    model = ModelConfig(source="minilm", batching={"max_batch_size": 16, "instances": 2, "max_queue_size": 300, "timeout_s": 9})
    fixed = RayOptions(min_replicas=3, max_replicas=3, replica_cpus=2).replica_deployment_options(model)
    assert fixed == {
        "ray_actor_options": {"num_cpus": 2.0},
        "max_ongoing_requests": 64,  # 16 rows x 2 worker threads x 2 batches in flight each
        "max_queued_requests": 300,
        "graceful_shutdown_timeout_s": 9.0,
        "max_constructor_retry_count": 2,
        "num_replicas": 3,
    }
    scaled = RayOptions(max_replicas=4, downscale_delay_s=60, autoscaling={"look_back_period_s": 5}).replica_deployment_options(model)
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 2.0,
        "downscale_delay_s": 60.0,
        "upscale_delay_s": 30.0,
        "look_back_period_s": 5,
    }
    assert "num_replicas" not in scaled
    from modelpress.errors import ConfigError
    from modelpress.scaleout.ray_serve import ray_options

    with pytest.raises(ConfigError, match="autoscaling repeats"):
        ray_options(autoscaling={"max_replicas": 9})
    with pytest.raises(ConfigError, match="initial_replicas"):
        ray_options(min_replicas=2, max_replicas=4, initial_replicas=1)


def test_errors_cross_the_ray_boundary_with_their_class_hint_and_fields():
    import pickle

    from modelpress.errors import InvalidInputError, ModelpressRuntimeError, ServerOverloadedError
    from modelpress.scaleout.ray_versions import error_state, rebuild_error

    sent = ServerOverloadedError("Model 'minilm:1' has 900 rows queued.", retry_after_s=7, hint="Retry later.")
    back = rebuild_error(pickle.loads(pickle.dumps(error_state(sent))))  # as Ray moves it: pickled data
    assert type(back) is ServerOverloadedError and back.retry_after_s == 7 and back.hint == "Retry later." and str(back) == str(sent)
    bad = rebuild_error(error_state(InvalidInputError("Input 0 is an int.", hint='Example: ["a text"]')))
    assert isinstance(bad, ValueError) and bad.message == "Input 0 is an int."
    other = rebuild_error(error_state(KeyError("input_ids")))  # not ours: a runtime error naming it
    assert type(other) is ModelpressRuntimeError and "KeyError('input_ids')" in other.message
