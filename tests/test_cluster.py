"""Past one machine: gptjax-launch's job files, a real SLURM cluster (tools/slurm_cluster, started by .ci/run), the
Kubernetes manifest through JAX's own detection, and the multi-process preflight's one-line errors."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gptjax.launch import Job, LaunchError, k8s_manifest, slurm_script, tpu_vm_script
from gptjax.runs import RunDir
from helpers import cpu_env
from test_multihost import free_port, losses, run_processes, write_config

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def slurm_up() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


needs_slurm = pytest.mark.skipif(not slurm_up() and not os.environ.get("GPTJAX_REQUIRE_SLURM"),
                                 reason="no SLURM cluster: tools/slurm_cluster up (CI does, and requires it)")


def job_state(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(JobState|Restarts|Reason|ExitCode)=(\S+)", out))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@needs_slurm
def test_slurm_job_trains_on_two_processes_is_preempted_requeued_and_resumes_exactly(tmp_path, small_corpus):
    """Submitted through gptjax-launch: two tasks form one 2-process JAX runtime (one 4-device mesh) through JAX's
    SLURM detection; ``scancel --signal=TERM`` makes them checkpoint and exit 75, the script requeues the job, the
    second attempt resumes (``--resume auto``) and every logged loss equals an uninterrupted run's."""
    steps = 30

    def config(name):
        path = write_config(tmp_path, small_corpus, tmp_path / name)
        cfg = json.loads(Path(path).read_text())
        cfg["train"].update(steps=steps, log_every=1, eval_every=15, checkpoint_every=1000)
        Path(path).write_text(json.dumps(cfg))
        return path

    reference = config("reference")
    run_processes(reference, 2, 2)  # uninterrupted, the same 2 processes x 2 devices on loopback

    slurm_run = tmp_path / "slurm"
    r = subprocess.run([BIN / "gptjax-launch", "slurm", "--name", "gptjax-test", "--processes-per-node", "2",
                        "--grace", "30", "--env", "JAX_PLATFORMS=cpu",
                        "--env", f"XLA_FLAGS={cpu_env(2)['XLA_FLAGS']}", "--workdir", str(tmp_path),
                        "--out", str(tmp_path / "job.sbatch"), "--submit", "--", "gptjax-train", "--config",
                        config("slurm")], capture_output=True, text=True, env=cpu_env(2), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    log = tmp_path / "slurm-logs" / f"gptjax-test-{job_id}.out"
    try:
        metrics = slurm_run / "metrics.jsonl"
        def started():
            assert job_state(job_id).get("JobState") in ("PENDING", "RUNNING"), log.read_text()[-3000:]
            return metrics.exists() and len(metrics.read_text().splitlines()) >= 6

        wait_for(started, 300, f"the job's first steps ({log})")
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
        # exit 75 -> scontrol requeue; the job may start again cred_expire seconds later (10 on the test cluster;
        # starting it sooner fails: "Job credential revoked")
        wait_for(lambda: job_state(job_id).get("Restarts") == "1", 120, "the requeue")
        wait_for(lambda: job_state(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300,
                 "the second attempt")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    out = log.read_text()
    assert job_state(job_id)["JobState"] == "COMPLETED", out[-3000:]
    assert "attempt 1 on localhost" in out and "attempt 2 on localhost" in out
    assert "pre-empted after a checkpoint (exit 75): requeueing" in out
    # one runtime: both tasks' start-up lines say 2 processes and 4 global devices
    assert len(re.findall(r"jax\.distributed: process [01] of 2, 2 local / 4 global devices", out)) == 4, out[-3000:]
    stopped = int(re.search(r"pre-empted \(SIGTERM\) at step (\d+)", out).group(1))
    assert 0 < stopped < steps
    assert f"restored step {stopped} from" in out  # the second attempt started from the pre-emption checkpoint
    by_step = {s: (loss, val) for s, loss, val in losses(slurm_run)}  # the resumed attempt's record wins
    expected = {s: (loss, val) for s, loss, val in losses(tmp_path / "reference")}
    assert by_step == expected  # bit-identical: the same process count resumes exactly
    assert json.loads((slurm_run / "summary.json").read_text())["final_step"] == steps


def test_slurm_script_for_gpus_per_task_and_per_host():
    per_gpu = Job(("gptjax-train", "--run-dir", "/shared/x"), nodes=2, gpus_per_node=8, time="04:00:00",
                  workdir="/shared")
    text = slurm_script(per_gpu, partition="gpu")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=04:00:00", "#SBATCH --partition=gpu", "#SBATCH --requeue"):
        assert line in text
    assert re.search(r"#SBATCH --signal=TERM@120\b", text)
    assert "gptjax-train --run-dir /shared/x --coordinator auto" in text and "GPTJAX_LOCAL_DEVICE_IDS" not in text
    per_host = Job(("gptjax-train",), nodes=2, gpus_per_node=8, per="host", workdir="/shared")
    text = slurm_script(per_host)
    assert "#SBATCH --ntasks-per-node=1" in text and "export GPTJAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in text
    single = Job(("gptjax-data", "prepare", "c.jsonl"), workdir="/shared")  # one process, no coordinator
    assert "srun --kill-on-bad-exit=1 gptjax-data prepare c.jsonl\n" in slurm_script(single)
    assert "--resume auto" not in slurm_script(single)
    r = subprocess.run(["bash", "-n"], input=slurm_script(per_gpu), text=True, capture_output=True)
    assert r.returncode == 0, r.stderr


def test_launch_refuses_what_cannot_work_in_one_line(tmp_path):
    with pytest.raises(LaunchError, match="runs as one process"):
        Job(("gptjax-data", "prepare", "x"), nodes=2)
    with pytest.raises(LaunchError, match="a pod is one process"):
        k8s_manifest(Job(("gptjax-train",), nodes=2, gpus_per_node=8, per="gpu"), "img")
    r = subprocess.run([BIN / "gptjax-launch", "slurm", "--nodes", "2", "--out", str(tmp_path / "j.sbatch"), "--",
                        "gptjax-eval", "perplexity"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "gptjax-eval runs as one process" in r.stderr
    assert not (tmp_path / "j.sbatch").exists()


def test_tpu_vm_script_runs_every_worker_with_detection_and_resume():
    text = tpu_vm_script(Job(("gptjax-train", "--run-dir", "/mnt/runs/x"), nodes=8, per="host", workdir=None),
                         "my-v5p", "us-east5-a", "proj")
    (cmd,) = [line for line in text.splitlines() if line.startswith("gcloud")]
    argv = shlex.split(cmd)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p"]
    assert {"--zone=us-east5-a", "--worker=all", "--project=proj"} <= set(argv)
    remote = next(a for a in argv if a.startswith("--command=")).removeprefix("--command=")
    assert shlex.split(remote) == ["gptjax-train", "--run-dir", "/mnt/runs/x", "--coordinator", "auto", "--resume",
                                   "auto"]


# ---- Kubernetes: the manifest's fields, and two pods' processes through JAX's K8sCluster ----------------------
FAKE_K8S = '''
"""What the Kubernetes API would answer a pod of the manifest in $GPTJAX_FAKE_K8S (test support: jax's
K8sCluster reads its pod, its Job and the services through the official client; this serves them from the
manifest, as the API server would after `kubectl apply`)."""
import os, types, yaml
from jax._src.clusters import k8s_cluster

docs = {d["kind"]: d for d in yaml.safe_load_all(open(os.environ["GPTJAX_FAKE_K8S"]))}
job, svc = docs["Job"], docs["Service"]
ns = job["metadata"]["namespace"]
k8s_cluster.K8sCluster._namespace = classmethod(lambda cls: ns)  # the service account's namespace file

def ns_(d):
    return types.SimpleNamespace(**{k: ns_(v) if isinstance(v, dict) and k not in ("labels", "selector") else v
                                    for k, v in d.items()})

def pod():
    index = os.environ["JOB_COMPLETION_INDEX"]
    spec = job["spec"]["template"]["spec"]
    labels = {**job["spec"]["template"]["metadata"]["labels"], "job-name": job["metadata"]["name"]}
    return ns_({"metadata": {"name": f"{job['metadata']['name']}-{index}-x", "labels": labels,
                             "owner_references": [types.SimpleNamespace(kind="Job", controller=True)]},
                "spec": {"subdomain": spec.get("subdomain")}})

class ApiException(Exception):
    status, reason = 500, "fake"

class CoreV1Api:
    def list_namespaced_pod(self, namespace, field_selector):
        assert namespace == ns
        return types.SimpleNamespace(items=[pod()])
    def list_namespaced_service(self, namespace):
        s = ns_({"metadata": svc["metadata"], "spec": {"cluster_ip": svc["spec"]["clusterIP"],
                                                       "selector": svc["spec"]["selector"]}})
        return types.SimpleNamespace(items=[s])

class BatchV1Api:
    def read_namespaced_job(self, name, namespace):
        assert name == job["metadata"]["name"] and namespace == ns
        return ns_({"metadata": {"name": name, "labels": job["metadata"]["labels"]},
                    "spec": {"parallelism": job["spec"]["parallelism"]}})

config = types.SimpleNamespace(load_incluster_config=lambda: None)
client = types.SimpleNamespace(CoreV1Api=CoreV1Api, BatchV1Api=BatchV1Api,
                               exceptions=types.SimpleNamespace(ApiException=ApiException))
'''


def test_k8s_manifest_has_what_jax_detection_reads():
    docs = k8s_manifest(Job(("gptjax-train", "--run-dir", "/shared/runs/x"), name="llama", nodes=4,
                            gpus_per_node=8, per="host", grace_s=90, workdir=None), "reg/gptjax:1", "ml", "runs")
    docs = list(yaml.safe_load_all(yaml.safe_dump_all(docs)))
    kinds = {d["kind"]: d for d in docs}
    job, svc, role = kinds["Job"], kinds["Service"], kinds["Role"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4  # process count
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == {"job-name": "llama"}
    assert pod["subdomain"] == svc["metadata"]["name"] == "llama"  # coordinator: llama-0.llama
    assert pod["serviceAccountName"] == "llama" and kinds["RoleBinding"]["roleRef"]["name"] == "llama"
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("pods", "list"), ("services", "list"), ("jobs", "get")} <= granted
    assert pod["terminationGracePeriodSeconds"] == 90 and pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["command"][-4:] == ["--coordinator", "auto", "--resume", "auto"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"name": "GPTJAX_LOCAL_DEVICE_IDS", "value": "0,1,2,3,4,5,6,7"} in c["env"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "runs"


@pytest.mark.skipif(os.geteuid() != 0, reason="maps the pods' host names to loopback in /etc/hosts (root)")
def test_two_pods_of_the_manifest_form_one_runtime_through_jax_k8s_detection(tmp_path, small_corpus):
    config = write_config(tmp_path, small_corpus, tmp_path / "k8s")
    cfg = json.loads(Path(config).read_text())
    cfg["train"].update(steps=2, log_every=1, eval_every=1000, checkpoint_every=1000)
    Path(config).write_text(json.dumps(cfg))
    name = f"gptjax-t{os.getpid()}"
    manifest = tmp_path / "job.yaml"
    r = subprocess.run([BIN / "gptjax-launch", "k8s", "--name", name, "--nodes", "2", "--image", "local",
                        "--env", "JAX_PLATFORMS=cpu", "--workdir", str(tmp_path), "--out", str(manifest), "--",
                        "gptjax-train", "--config", config], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (tmp_path / "fake_k8s").mkdir()
    (tmp_path / "fake_k8s" / "kubernetes.py").write_text(FAKE_K8S)
    container = {d["kind"]: d for d in yaml.safe_load_all(manifest.read_text())}["Job"]["spec"]["template"]["spec"][
        "containers"][0]
    hosts = Path("/etc/hosts")
    original = hosts.read_text()
    hosts.write_text(original + f"127.0.0.1 {name}-0.{name} {name}-0 {name}-1  # gptjax test\n")
    try:
        env = cpu_env(2)
        env.update({e["name"]: e["value"] for e in container["env"]})
        env.update(KUBERNETES_SERVICE_HOST="10.0.0.1", GPTJAX_FAKE_K8S=str(manifest),
                   PYTHONPATH=os.pathsep.join([str(tmp_path / "fake_k8s"), env.get("PYTHONPATH", "")]),
                   PATH=f"{BIN}{os.pathsep}{env['PATH']}")
        procs = [subprocess.Popen(container["command"], cwd=container["workingDir"], text=True,
                                  env={**env, "JOB_COMPLETION_INDEX": str(i), "HOSTNAME": f"{name}-{i}"},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        hosts.write_text(original)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    for i, out in enumerate(outs):
        assert f"jax.distributed: process {i} of 2, 2 local / 4 global devices" in out
    assert json.loads((tmp_path / "k8s" / "summary.json").read_text())["final_step"] == 2


# ---- the preflight: one line and exit 2 instead of a hang or a traceback -------------------------------------
def start(config: str, n: int, devices: int, *extra: str, env: dict | None = None, ids=None) -> list:
    port = free_port()
    cmd = [sys.executable, "-m", "gptjax.cli.train", "--config", config, "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", str(n), *extra]
    return [subprocess.Popen(cmd + ["--process-id", str(i)], env={**cpu_env(devices), **(env or {})}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (ids or range(n))]


def errors(procs) -> list[str]:
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2] * len(procs), [o[1][-1500:] for o in outs]
    lines = [[ln for ln in err.splitlines() if ln.startswith("error: ")] for _, err in outs]
    assert all(len(x) == 1 for x in lines), [err[-1500:] for _, err in outs]
    return [x[0] for x in lines]


@pytest.fixture
def tiny_config(tmp_path, small_corpus):
    return write_config(tmp_path, small_corpus, tmp_path / "run")


def test_a_partial_slurm_environment_is_one_line(tiny_config):
    env = {"SLURM_JOB_ID": "17", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    r = subprocess.run([sys.executable, "-m", "gptjax.cli.train", "--config", tiny_config, "--coordinator", "auto"],
                       env={**cpu_env(2), **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: SLURM_JOB_ID=17 is set but SLURM_STEP_NODELIST is not: this is an "
                                "allocation's shell or a batch script, not a job step; start each process with srun "
                                "(srun -n N gptjax-train --coordinator auto ...), or use gptjax-launch slurm, which "
                                "does")


def test_a_coordinator_that_does_not_answer_and_processes_that_do_not_join(tiny_config):
    quick = {"GPTJAX_INIT_TIMEOUT": "4"}
    (alone,) = errors(start(tiny_config, 2, 2, env=quick, ids=[1]))  # no process 0 anywhere
    assert re.fullmatch(r"error: coordinator 127\.0\.0\.1:\d+ did not answer within 4 s \(this is process 1 of 2 "
                        r"on \S+\): check that process 0 runs on that host and that the port is reachable from here "
                        r"\(GPTJAX_INIT_TIMEOUT sets the wait\)", alone), alone
    first, second = errors(start(tiny_config, 3, 2, env=quick, ids=[0, 1]))  # process 2 never starts
    assert first == second and re.fullmatch(r"error: coordinator 127\.0\.0\.1:\d+: processes 2 of 3 did not join "
                                            r"within 4 s \(joined: 0, 1\); .*", first), first


def test_devices_that_do_not_match_the_mesh(tiny_config):
    # the config's mesh is data=2 x fsdp=2 (4 devices); 2 processes with 1 device each have 2
    first, second = errors(start(tiny_config, 2, 1))
    assert first == second and "(2 processes x 1 device each)" in first and "mesh" in first, first


def test_a_process_count_that_does_not_divide_the_batch_shards(tiny_config):
    first, _ = errors(start(tiny_config, 2, 2, "--set", "mesh.data=1", "--set", "mesh.fsdp=1", "--set",
                            "mesh.tensor=4", "--set", "model.n_kv_heads=4"))
    assert first == ("error: mesh data x fsdp = 1 x 1 = 1 batch shards cannot be split over 2 processes (each loads "
                     "its own rows): make data x fsdp a multiple of 2, e.g. --set mesh.data=2")


def test_a_run_directory_not_every_process_sees(tmp_path, tiny_config):
    # two processes, each given its own directory: what two hosts without a shared filesystem would see
    procs = [subprocess.Popen([sys.executable, "-m", "gptjax.cli.train", "--config", tiny_config, "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), "--run-dir",
                               str(tmp_path / f"host{i}")], env=cpu_env(2), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for port in [free_port()] for i in range(2)]
    for i, line in enumerate(errors(procs)):  # each names its own directory
        assert re.fullmatch(rf"error: run directory \S+host{i} is not shared: processes 0, 1 of 2 do not see the "
                            r"files the others wrote there; .*", line), line
    assert not list((tmp_path / "host0").glob(".preflight-*"))  # the probe is cleaned up


def test_resume_auto_starts_fresh_without_a_checkpoint(tmp_path):
    run = RunDir(tmp_path / "r")
    assert not run.has_checkpoint()
    (run.checkpoints / "4").mkdir(parents=True)
    run.config.write_text("{}")
    assert run.has_checkpoint()


def test_the_cluster_script_names_its_commands():
    r = subprocess.run([Path(__file__).parents[1] / "tools" / "slurm_cluster"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: tools/slurm_cluster up|down|status" in r.stderr
    assert socket.gethostbyname("localhost").startswith("127.")  # the node's address


@needs_slurm
def test_bringing_the_cluster_up_again_is_a_no_op():
    tool = Path(__file__).parents[1] / "tools" / "slurm_cluster"
    pids = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, text=True).stdout
    r = subprocess.run([tool, "up"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and re.search(r"debug\*\s+up\s+infinite\s+1\s+(idle|mixed|allocated)", r.stdout), r
    assert subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, text=True).stdout == pids  # not restarted
    assert subprocess.run([tool, "status"], capture_output=True).returncode == 0


def test_tpu_jobset_manifest_joins_the_slices_as_jax_detection_reads_them(monkeypatch):
    """Two TPU slices of two hosts on GKE: one indexed Job per slice, each alone on a node pool, and the MEGASCALE
    variables. With what GKE's webhook adds inside a slice (TPU_WORKER_ID, TPU_WORKER_HOSTNAMES), JAX's own TPU
    detection numbers the four processes 0-3 slice by slice and finds the coordinator on slice 0's first host."""
    from jax._src.clusters.cloud_tpu_cluster import GkeTpuCluster

    from gptjax.launch import tpu_jobset_manifest

    (doc,) = yaml.safe_load_all(yaml.safe_dump_all(tpu_jobset_manifest(
        Job(("gptjax-train", "--run-dir", "gs://b/runs/x"), name="big", nodes=2, per="host", grace_s=60,
            workdir=None), "reg/gptjax:1", 2, "tpu-v5p-slice", "2x2x2", 4, "ml")))
    assert doc["kind"] == "JobSet" and doc["metadata"]["namespace"] == "ml"
    assert doc["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == \
        "cloud.google.com/gke-nodepool"
    (rjob,) = doc["spec"]["replicatedJobs"]
    spec = rjob["template"]["spec"]
    pod = spec["template"]["spec"]
    assert rjob["name"] == "slice" and rjob["replicas"] == 2 and spec["completions"] == spec["parallelism"] == 2
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x2x2"}
    assert pod["terminationGracePeriodSeconds"] == 60 and pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["google.com/tpu"] == 4
    assert c["command"][-4:] == ["--coordinator", "auto", "--resume", "auto"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["MEGASCALE_NUM_SLICES"] == "2" and env["MEGASCALE_COORDINATOR_ADDRESS"] == "big-slice-0-0.big"
    assert env["MEGASCALE_SLICE_ID"] == {"fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}}
    ids = []
    for slice_id in range(2):
        for worker in range(2):
            monkeypatch.setenv("MEGASCALE_SLICE_ID", str(slice_id))  # the label the fieldRef resolves to
            for name in ("MEGASCALE_NUM_SLICES", "MEGASCALE_COORDINATOR_ADDRESS"):
                monkeypatch.setenv(name, env[name])
            monkeypatch.setenv("TPU_WORKER_ID", str(worker))
            monkeypatch.setenv("TPU_WORKER_HOSTNAMES", f"big-slice-{slice_id}-0.big,big-slice-{slice_id}-1.big")
            ids.append((GkeTpuCluster.get_process_id(), GkeTpuCluster.get_process_count()))
    assert ids == [(0, 4), (1, 4), (2, 4), (3, 4)]
    with pytest.raises(LaunchError, match="runs as one process"):
        tpu_jobset_manifest(Job(("gptjax-data", "prepare"), per="host"), "img", 2, "tpu-v5p-slice", "2x2x2", 4)
