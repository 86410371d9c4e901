"""Launch a gptjax command on a cluster through the scheduler's own means and JAX's own cluster detection.

``Job`` says what runs (any gptjax command: training, data preparation, evaluation) and how many processes on how
many hosts; ``slurm_script``, ``k8s_manifest`` and ``tpu_vm_script`` write it for SLURM (an ``sbatch`` script),
Kubernetes (an indexed Job, its headless Service and the pod-reading role JAX's detection needs) and Cloud TPU VMs
(``gcloud ... tpu-vm ssh --worker=all``); ``tpu_jobset_manifest`` writes a JobSet of several TPU slices on GKE
(one Job per slice, joined over DCN). No process manager of our own: the scheduler starts the processes,
``gptjax-train --coordinator auto`` finds its peers through ``jax.distributed``'s detection, and pre-emption is the
scheduler's SIGTERM, on which the trainer checkpoints and exits 75; the job then runs again with ``--resume auto``.

One process per GPU is what JAX's SLURM detection assumes (process ``SLURM_LOCALID`` drives GPU ``SLURM_LOCALID``,
every process seeing all of the host's GPUs); one process per host with all of its GPUs needs
``GPTJAX_LOCAL_DEVICE_IDS`` (set here), or JAX gives that process GPU 0 alone.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# gptjax-train is the multi-process command (jax.distributed); the others run as one process (gptjax-data's
# --workers parallelise preparation on one host)
DISTRIBUTED = {"gptjax-train"}
EXIT_PREEMPTED = 75  # gptjax-train's exit code after a SIGTERM and a checkpoint
PER = ("gpu", "host")


class SubmitError(RuntimeError):
    """sbatch is missing or refused a script; the message says which and what it said."""


def submit(script: str | Path) -> str:
    """Submit an sbatch script; its job id. The one place gptjax runs ``sbatch`` (the launcher and the sweep
    runner's job arrays)."""
    try:
        r = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise SubmitError(f"sbatch not found: submit {script} from a SLURM login node (or tools/slurm_cluster up)") \
            from None
    if r.returncode:
        raise SubmitError(f"sbatch refused {script}: {r.stderr.strip()}")
    return r.stdout.strip().split(";")[0]
ARRAY_INDEX = "{array_index}"  # stands for $SLURM_ARRAY_TASK_ID in a command
SLURM_LOGS = "slurm-logs"  # under the working directory: where sbatch appends each job's output
K8S_COORDINATOR_PORT = 55527  # JAX's Kubernetes detection puts the coordinator there (K8sCluster)


class LaunchError(Exception):
    """A job that cannot be launched as asked; the message names the fix."""


@dataclass(frozen=True)
class Job:
    command: tuple[str, ...]  # e.g. ("gptjax-train", "--config", "experiments/austen.py", "--run-dir", "/shared/x")
    name: str = "gptjax"
    nodes: int = 1
    gpus_per_node: int = 0
    per: str = "gpu"  # one process per GPU, or per host (all of its GPUs)
    processes_per_node: int | None = None  # explicit count (CPU-only clusters); default from per / gpus_per_node
    grace_s: int = 120  # SIGTERM this long before the time limit (SLURM) / the termination grace (Kubernetes)
    time: str | None = None  # SLURM time limit, e.g. "04:00:00"
    workdir: str | None = field(default_factory=os.getcwd)  # None: where the container / VM starts
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.command:
            raise LaunchError("no command: give it after --, e.g. -- gptjax-train --config experiments/austen.py")
        if self.per not in PER:
            raise LaunchError(f"--per {self.per!r}: choose one of {', '.join(PER)}")
        if self.nodes < 1 or self.gpus_per_node < 0 or (self.processes_per_node or 1) < 1:
            raise LaunchError(f"--nodes {self.nodes}, --gpus-per-node {self.gpus_per_node} and "
                              f"--processes-per-node {self.processes_per_node} must be positive")
        if self.processes > 1 and self.program not in DISTRIBUTED:
            raise LaunchError(f"{self.program} runs as one process; launch it with --nodes 1 and one process (its "
                              "own --workers parallelise it), or train with gptjax-train")
        if self.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}|infinite|unlimited", self.time.lower()):
            raise LaunchError(f"--time {self.time!r}: a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                              "D-HH:MM:SS or infinite")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", self.name) or len(self.name) > 40:
            raise LaunchError(f"--name {self.name!r}: lower-case letters, digits and '-', at most 40 characters "
                              "(a Kubernetes name as well as a SLURM one)")

    @property
    def program(self) -> str:
        return Path(self.command[0]).name

    @property
    def per_node(self) -> int:
        if self.processes_per_node:
            return self.processes_per_node
        return self.gpus_per_node if self.per == "gpu" and self.gpus_per_node else 1

    @property
    def processes(self) -> int:
        return self.nodes * self.per_node

    def argv(self, resume_auto: bool = False) -> list[str]:
        """The command each process runs: a multi-process gptjax-train finds its peers through JAX's detection;
        ``resume_auto``: a training command continues its run if it has a checkpoint (every start but the first)."""
        cmd = list(self.command)
        if self.program in DISTRIBUTED and self.processes > 1 and "--coordinator" not in cmd:
            cmd += ["--coordinator", "auto"]
        if resume_auto and self.resumable:
            cmd += ["--resume", "auto"]
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(self.env)
        if self.per == "host" and self.gpus_per_node > 1 and not self.processes_per_node:
            env.setdefault("GPTJAX_LOCAL_DEVICE_IDS", ",".join(map(str, range(self.gpus_per_node))))
        return env

    @property
    def resumable(self) -> bool:
        return self.program == "gptjax-train" and "--resume" not in self.command


def _bin_path() -> str:
    """The directory of this interpreter's console scripts (a virtual environment's bin/), put first on PATH."""
    return str(Path(sys.executable).parent)


def slurm_script(job: Job, partition: str | None = None, account: str | None = None,
                 log_dir: str = SLURM_LOGS, extra: tuple[str, ...] = ()) -> str:
    """An ``sbatch`` script: ``--requeue``, SIGTERM to every task ``grace_s`` before the time limit; a task that
    exits 75 (checkpointed after SIGTERM: the time limit, ``scancel --signal=TERM``, or pre-emption) requeues the
    job, and the next attempt runs with ``--resume auto``."""
    q = shlex.quote
    lines = ["#!/bin/bash", f"# written by gptjax-launch slurm: {shlex.join(job.command)}",
             f"#SBATCH --job-name={job.name}", f"#SBATCH --nodes={job.nodes}",
             f"#SBATCH --ntasks-per-node={job.per_node}"]
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    lines += [f"#SBATCH --time={job.time}"] * bool(job.time)
    lines += [f"#SBATCH --partition={partition}"] * bool(partition)
    lines += [f"#SBATCH --account={account}"] * bool(account)
    lines += [f"#SBATCH {x}" for x in extra]
    log = Path(job.workdir or ".", log_dir)
    pattern = "%x-%A_%a.out" if any(x.startswith("--array") for x in extra) else "%x-%j.out"
    lines += [f"#SBATCH --signal=TERM@{job.grace_s}  # the trainer checkpoints and exits 75",
              "#SBATCH --requeue", "#SBATCH --open-mode=append", f"#SBATCH --output={log}/{pattern}", "",
              "set -uo pipefail", f"cd {q(job.workdir or '.')}", f"export PATH={q(_bin_path())}:$PATH"]
    lines += [f"export {k}={q(v)}" for k, v in job.environment().items()]
    # "{array_index}" in a command is the array task's index (sbatch --array)
    argv = shlex.join(job.argv()).replace(shlex.quote(ARRAY_INDEX), '"$SLURM_ARRAY_TASK_ID"')
    lines += ['attempt=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))',
              'echo "gptjax-launch: job $SLURM_JOB_ID attempt $attempt on $SLURM_JOB_NODELIST"']
    if job.resumable:
        lines += ["resume=()", '[ "$attempt" -gt 1 ] && resume=(--resume auto)  # requeued: continue the run',
                  f'srun --kill-on-bad-exit=1 {argv} "${{resume[@]}}"']
    else:
        lines.append(f"srun --kill-on-bad-exit=1 {argv}")
    lines += ["rc=$?", f'if [ "$rc" -eq {EXIT_PREEMPTED} ]; then',
              '    echo "gptjax-launch: pre-empted after a checkpoint (exit 75): requeueing job $SLURM_JOB_ID"',
              '    scontrol requeue "$SLURM_JOB_ID"', "fi", 'exit "$rc"', ""]
    return "\n".join(lines)


def _labels(job: Job) -> dict:
    """The labels of a job's Kubernetes objects; a fresh dict each call (YAML would otherwise write anchors)."""
    return {"app.kubernetes.io/name": "gptjax", "gptjax/job": job.name}


def k8s_manifest(job: Job, image: str, namespace: str = "default", volume_claim: str | None = None,
                 mount: str = "/shared") -> list[dict]:
    """An indexed Job (one pod per host, ``completionMode: Indexed`` gives ``JOB_COMPLETION_INDEX``), the headless
    Service its ``subdomain`` names (pod 0 is the coordinator, ``<job>-0.<service>``), and a ServiceAccount with
    the Role JAX's Kubernetes detection needs (it reads its pod, its Job and the services). A pod that exits 75
    after SIGTERM (the node drained, pre-empted) fails its index, the Job starts it again (``backoffLimit``),
    and the command runs with ``--resume auto`` every time."""
    if job.per_node != 1:
        raise LaunchError("on Kubernetes a pod is one process: use --per host (each pod drives its node's GPUs)")
    env = [{"name": k, "value": v} for k, v in job.environment().items()]
    container = {"name": "gptjax", "image": image, "command": job.argv(resume_auto=True), "env": env,
                 "ports": [{"containerPort": K8S_COORDINATOR_PORT, "name": "coordinator"}]}
    if job.workdir:
        container["workingDir"] = job.workdir
    if job.gpus_per_node:
        container["resources"] = {"limits": {"nvidia.com/gpu": job.gpus_per_node}}
    pod: dict = {"subdomain": job.name, "serviceAccountName": job.name, "restartPolicy": "Never",
                 "terminationGracePeriodSeconds": job.grace_s, "containers": [container]}
    if volume_claim:
        container["volumeMounts"] = [{"name": "shared", "mountPath": mount}]
        pod["volumes"] = [{"name": "shared", "persistentVolumeClaim": {"claimName": volume_claim}}]
    def meta() -> dict:
        return {"name": job.name, "namespace": namespace, "labels": _labels(job)}

    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(),
         "rules": [{"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["get", "list"]},
                   {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(),
         "subjects": [{"kind": "ServiceAccount", "name": job.name, "namespace": namespace}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": job.name}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(),
         "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"job-name": job.name},
                  "ports": [{"port": K8S_COORDINATOR_PORT, "name": "coordinator"}]}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta(),
         "spec": {"completionMode": "Indexed", "completions": job.nodes, "parallelism": job.nodes,
                  "backoffLimit": 4 * job.nodes,
                  "template": {"metadata": {"labels": _labels(job)}, "spec": pod}}},
    ]


MEGASCALE_PORT = 8080  # libtpu's port for the slices' DCN rendezvous (the MEGASCALE_* variables)
TPU_PORTS = (8471, MEGASCALE_PORT, 8476)  # the TPU runtime, megascale, JAX's coordinator (jax.distributed default)


def tpu_jobset_manifest(job: Job, image: str, slices: int, accelerator: str, topology: str, chips_per_host: int,
                        namespace: str = "default") -> list[dict]:
    """A JobSet for ``slices`` TPU slices on GKE (the xpk form): one indexed Job per slice (``job.nodes`` hosts
    each, one process per host), each slice alone on its node pool (``exclusive-topology``), and the variables that
    join the slices over DCN: ``MEGASCALE_NUM_SLICES``, ``MEGASCALE_SLICE_ID`` (the Job's index in the set) and
    ``MEGASCALE_COORDINATOR_ADDRESS`` (the first host of slice 0, through the JobSet's headless service). GKE's TPU
    webhook adds ``TPU_WORKER_ID`` / ``TPU_WORKER_HOSTNAMES`` inside each slice; JAX's TPU detection numbers the
    processes slice by slice from these (``--coordinator auto``), and the devices' ``slice_index`` tells
    ``mesh.slices`` where the slices meet. A pre-empted host fails its slice's Job; the JobSet restarts all of them
    (``failurePolicy``) and the command runs with ``--resume auto``."""
    if job.per_node != 1:
        raise LaunchError("on a TPU host one process drives all its chips: use --per host")
    if slices < 1 or chips_per_host < 1:
        raise LaunchError(f"--slices {slices} and --chips-per-host {chips_per_host} must be positive")
    if slices > 1 and job.program not in DISTRIBUTED:
        raise LaunchError(f"{job.program} runs as one process; launch it on one slice (--slices 1 --nodes 1)")
    env = [{"name": k, "value": v} for k, v in job.environment().items()]
    if slices > 1:
        env += [{"name": "MEGASCALE_NUM_SLICES", "value": str(slices)},
                {"name": "MEGASCALE_SLICE_ID",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}}},
                {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{job.name}-slice-0-0.{job.name}"},
                {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)}]
    every_host = dataclasses.replace(job, nodes=job.nodes * slices)  # (its processes find each other: JAX's detection)
    container = {"name": "gptjax", "image": image, "command": every_host.argv(resume_auto=True), "env": env,
                 "ports": [{"containerPort": p} for p in TPU_PORTS],
                 "resources": {"limits": {"google.com/tpu": chips_per_host}}}
    if job.workdir:
        container["workingDir"] = job.workdir
    pod = {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet", "restartPolicy": "Never",
           "terminationGracePeriodSeconds": job.grace_s,
           "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": accelerator,
                            "cloud.google.com/gke-tpu-topology": topology},
           "containers": [container]}
    slice_job = {"parallelism": job.nodes, "completions": job.nodes, "backoffLimit": 0,
                 "template": {"metadata": {"labels": _labels(job)}, "spec": pod}}
    return [{"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
             "metadata": {"name": job.name, "namespace": namespace, "labels": _labels(job),
                          "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology":
                                          "cloud.google.com/gke-nodepool"}},
             "spec": {"failurePolicy": {"maxRestarts": 4},
                      "replicatedJobs": [{"name": "slice", "replicas": slices, "template": {"spec": slice_job}}]}}]


def tpu_vm_script(job: Job, tpu: str, zone: str, project: str | None = None) -> str:
    """``gcloud compute tpus tpu-vm ssh <tpu> --worker=all``: the command on every host of a TPU VM slice at once;
    JAX's Cloud TPU detection finds the peers. Run the script again after a pre-emption: it resumes."""
    if job.per_node != 1:
        raise LaunchError("on a TPU VM each host runs one process with all of its chips: use --per host")
    env = "".join(f"export {k}={shlex.quote(v)}; " for k, v in job.environment().items())
    cd = f"cd {shlex.quote(job.workdir)} && " if job.workdir else ""
    remote = f"{env}{cd}{shlex.join(job.argv(resume_auto=True))}"
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}", "--worker=all",
              f"--command={remote}"] + ([f"--project={project}"] if project else [])
    return "\n".join(["#!/bin/bash", f"# written by gptjax-launch tpu-vm: {shlex.join(job.command)}",
                      "# every host must see the same run directory (a Filestore / gcsfuse mount at the same path)",
                      "set -euo pipefail", shlex.join(gcloud), ""])


def with_env(job: Job, pairs: list[str]) -> Job:
    """``KEY=VALUE`` strings added to the job's environment."""
    env = dict(job.env)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"--env {pair!r}: give KEY=VALUE")
        env[key] = value
    return dataclasses.replace(job, env=tuple(env.items()))
