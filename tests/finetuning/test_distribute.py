"""--strategy: strategy choice, TF_CONFIG validation, global batches, and real two-replica runs.

Two replicas on CPU: the CPU is split into two logical devices, which TensorFlow allows only
before it starts, so those runs happen in a subprocess (tests/_two_devices.py) and the rest
of the suite keeps one device. The two-process multi-worker run on loopback takes over a
minute on 2 cores, so it only runs with DOGTL_TEST_MULTIWORKER=1:

    DOGTL_TEST_MULTIWORKER=1 python -m pytest tests/finetuning/test_distribute.py -k multi_worker
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHEAP, assert_clean_error, run_cli

from dogtl.core.distribute import Worker, check_global_batch, check_strategy, read_tf_config, training_steps
from dogtl.core.errors import DogtlError

HERE = Path(__file__).parent


def run_scenario(scenario: str, root: Path, stage3) -> subprocess.Popen:
    args = [sys.executable, str(HERE / "_two_devices.py"), scenario, str(root), str(stage3.data),
            str(stage3.weights), str(stage3.cache), str(stage3.head)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(process: subprocess.Popen, timeout: float = 600) -> dict:
    out, err = process.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, f"exit {process.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def mirrored(stage3, tmp_path_factory):
    return result_of(run_scenario("mirrored", tmp_path_factory.mktemp("mirrored"), stage3))


def test_mirrored_really_runs_on_two_replicas(mirrored):
    assert mirrored["replicas"] == 2
    assert [d.rsplit("/", 1)[-1] for d in mirrored["devices"]] == ["device:CPU:0", "device:CPU:1"]


def test_mirrored_extraction_gives_the_same_cache(mirrored):
    e = mirrored["extract"]
    assert e["same_rows"] and e["same_fingerprint"]  # the strategy is no part of the cache's identity
    assert e["max_feature"] > 0.1
    # Each replica computes its half of every batch (odd batches padded, a batch of one image
    # included): the features are the single device's, up to rounding.
    assert e["max_diff"] <= 1e-5 * e["max_feature"] and e["test_max_diff"] <= 1e-5 * e["max_feature"], e


def test_mirrored_finetuning_matches_one_device(mirrored):
    one, two = mirrored["default"], mirrored["mirrored"]
    assert one["before"] == pytest.approx(two["before"], rel=1e-6)
    # The batch is global and gradients are averaged over it: one epoch of SGD on two replicas
    # is the same optimisation as on one device. A loss summed over the replicas instead of
    # averaged would double every step; the update here moves the validation loss by far more
    # than the tolerance.
    assert abs(one["val"][0] - one["before"]) > 20 * 1e-4 * one["before"]
    assert two["loss"][0] == pytest.approx(one["loss"][0], rel=1e-4)
    assert two["val"][0] == pytest.approx(one["val"][0], rel=1e-4)


def test_strategy_names_and_global_batch_rules():
    assert check_strategy("mirrored") == "mirrored"
    with pytest.raises(DogtlError, match=r"--strategy 'gpu': choose one of default, mirrored, multi-worker"):
        check_strategy("gpu")

    class Two:
        num_replicas_in_sync = 2

    check_global_batch(8, Two())
    check_global_batch(7, None)
    with pytest.raises(DogtlError, match=r"--batch-size 7 must split evenly over the 2 replicas.*--batch-size 6"):
        check_global_batch(7, Two())
    with pytest.raises(DogtlError, match=r"training set \(5 images"):
        check_global_batch(8, Two(), images=5)
    assert training_steps(18, 8, None) == 3 and training_steps(18, 8, Two()) == 3
    assert training_steps(17, 8, Two()) == 2  # a last batch of one image cannot feed two replicas
    assert training_steps(16, 8, Two()) == 2


def tf_config(cluster, task_type="worker", index=0):
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})}


def test_tf_config_is_validated_with_one_clear_line():
    config, me = read_tf_config(tf_config({"worker": ["a:1", "b:2"]}, index=1))
    assert me == Worker("worker", 1, 2, False) and not me.is_chief
    assert me.private_path("cache/features.h5") == Path("cache/features.worker-1.h5")
    _, chief = read_tf_config(tf_config({"chief": ["c:1"], "worker": ["a:1"]}, "chief", 0))
    assert chief.is_chief and chief.private_path("m.keras") == Path("m.keras")
    _, w0 = read_tf_config(tf_config({"chief": ["c:1"], "worker": ["a:1"]}, "worker", 0))
    assert not w0.is_chief and w0.num_workers == 2
    assert Worker().is_chief
    bad = [
        ({}, "TF_CONFIG is not set"),
        ({"TF_CONFIG": "{cluster: 1}"}, "is not valid JSON"),
        ({"TF_CONFIG": "[]"}, 'has no "cluster" object'),
        (tf_config({"worker": []}), "must be a non-empty list"),
        (tf_config({"worker": ["localhost"]}), "'localhost', not a \"host:port\" address"),
        (tf_config({"worker": ["a:1", "a:1"]}), "lists an address twice"),
        (tf_config({"worker": ["a:1"], "ps": ["b:2"]}), r"task types \['ps'\]"),
        (tf_config({"worker": ["a:1", "b:2"]}, index=2), r"task.index is 2; this cluster has worker 0..1"),
        (tf_config({"worker": ["a:1"]}, "chief"), r"task.type is 'chief'"),
        ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}})}, 'has no "task" object'),
    ]
    for environ, message in bad:
        with pytest.raises(DogtlError, match=message) as e:
            read_tf_config(environ)
        assert "\n" not in str(e.value) and "--strategy multi-worker: TF_CONFIG" in str(e.value)
        assert 'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345"' in str(e.value)  # shows a working one


def test_cli_refuses_bad_strategy_and_tf_config(synthetic_data, tmp_path, monkeypatch):
    assert_clean_error(run_cli("extract-features", "--data", synthetic_data, "--cache", tmp_path / "f.h5", *CHEAP,
                               "--strategy", "tpu"), r"--strategy 'tpu': choose one of")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}}')
    assert_clean_error(run_cli("extract-features", "--data", synthetic_data, "--cache", tmp_path / "f.h5", *CHEAP,
                               "--strategy", "multi-worker"), r"task.index is 3")
    assert not (tmp_path / "f.h5").exists()
    assert_clean_error(run_cli("finetune", "--data", synthetic_data, "--head", tmp_path / "none.keras",
                               "--strategy", "multi-worker"), r"TF_CONFIG task.index is 3")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.skipif(os.environ.get("DOGTL_TEST_MULTIWORKER") != "1",
                    reason="two TensorFlow processes take over a minute on 2 cores: set DOGTL_TEST_MULTIWORKER=1")
def test_multi_worker_on_loopback(stage3, tmp_path):
    """Two workers on localhost: extraction and fine-tuning in lockstep, with the results of one
    device; the chief writes the real files, the other worker its own copies beside them."""
    from _two_devices import finetune_with, no_dropout_head

    head = no_dropout_head(stage3.head, tmp_path / "models" / "head.keras")
    workers = [f"localhost:{p}" for p in free_ports(2)]
    processes = [subprocess.Popen([sys.executable, str(HERE / "_two_devices.py"), "multi-worker", str(tmp_path),
                                   str(stage3.data), str(stage3.weights), str(stage3.cache), str(head)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, CUDA_VISIBLE_DEVICES="",
                                           **tf_config({"worker": workers}, index=k)))
                 for k in range(2)]
    one = finetune_with("default", stage3.data, stage3.weights, stage3.cache, head, tmp_path / "one.keras")
    chief, other = [result_of(p, timeout=900) for p in processes]
    assert chief["chief"] and not other["chief"] and chief["replicas"] == other["replicas"] == 2
    assert Path(chief["cache"]) == tmp_path / "features.h5"
    assert Path(other["cache"]) == tmp_path / "features.worker-1.h5"
    for r in (chief, other):
        e = r["extract"]
        assert e["same_rows"] and e["same_fingerprint"] and e["max_diff"] <= 1e-5 * e["max_feature"], e
        # Each worker took its half of every global batch: the optimisation of one device.
        assert r["finetune"]["before"] == pytest.approx(one["before"], rel=1e-6)
        assert r["finetune"]["val"][0] == pytest.approx(one["val"][0], rel=1e-4)
        assert r["finetune"]["loss"][0] == pytest.approx(one["loss"][0], rel=1e-4)
    assert Path(chief["finetune"]["path"]) == tmp_path / "finetuned.keras"
    assert Path(other["finetune"]["path"]) == tmp_path / "finetuned.worker-1.keras"
