"""``gptjax-launch``: write (and for SLURM submit) the job that runs a gptjax command on a cluster.

Examples::

    # SLURM, 2 nodes x 8 GPUs, one process per GPU; requeued on pre-emption, resumed from the checkpoint
    gptjax-launch slurm --nodes 2 --gpus-per-node 8 --time 04:00:00 --submit -- \\
        gptjax-train --config experiments/austen.py --run-dir /shared/runs/austen
    # one process per host driving all 8 GPUs (GPTJAX_LOCAL_DEVICE_IDS is set for JAX)
    gptjax-launch slurm --nodes 2 --gpus-per-node 8 --per host -- gptjax-train --run-dir /shared/runs/x
    # data preparation as a one-process job
    gptjax-launch slurm --submit -- gptjax-data prepare corpus.jsonl --tokenizer tok.model --out /shared/data/c
    # Kubernetes / GKE: an indexed Job + headless Service + the role JAX's detection needs
    gptjax-launch k8s --nodes 4 --gpus-per-node 8 --per host --image REGISTRY/gptjax:latest \\
        --volume-claim runs --out job.yaml -- gptjax-train --run-dir /shared/runs/x
    # Cloud TPU VM slice: every worker at once through gcloud
    gptjax-launch tpu-vm --tpu my-v5p-64 --zone us-east5-a --per host --nodes 8 --out launch.sh -- \\
        gptjax-train --run-dir /shared/runs/x
    # two TPU v5p slices of 4 hosts on GKE, joined over DCN (a JobSet; the run's mesh.slices=2)
    gptjax-launch tpu-gke --slices 2 --nodes 4 --accelerator tpu-v5p-slice --topology 2x4x4 \
        --image REGISTRY/gptjax:latest --out slices.yaml -- gptjax-train --run-dir gs://bucket/runs/x \
        --set mesh.slices=2

Exit codes: 0 written (and submitted), 2 a job that cannot work as asked (one line on stderr, nothing written),
1 sbatch refused it (its message).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from gptjax.cli.common import UserError, console_script, user_errors
from gptjax.launch import PER
from gptjax.runs import check_overwrite


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax-launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="target", required=True)
    for target, help_ in (("slurm", "an sbatch script; --submit submits it"),
                          ("k8s", "an indexed Job manifest (YAML) for Kubernetes / GKE"),
                          ("tpu-vm", "a gcloud tpu-vm ssh --worker=all script for a Cloud TPU VM slice"),
                          ("tpu-gke", "a JobSet manifest (YAML) for one or several TPU slices on GKE (DCN)")):
        s = sub.add_parser(target, help=help_)
        s.add_argument("--name", default="gptjax", help="job name (lower-case letters, digits, '-')")
        s.add_argument("--nodes", type=int, default=1, help="hosts")
        s.add_argument("--gpus-per-node", type=int, default=0)
        s.add_argument("--per", choices=PER, default="gpu" if target == "slurm" else "host",
                       help="one process per GPU (JAX's SLURM default) or one per host driving all its GPUs")
        s.add_argument("--processes-per-node", type=int, help="explicit process count per host (CPU clusters)")
        s.add_argument("--grace", type=int, default=120, metavar="S",
                       help="seconds between SIGTERM and the end: the trainer's time to checkpoint")
        s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set in every process")
        s.add_argument("--workdir", default=str(Path.cwd()) if target == "slurm" else None,
                       help="where the command runs, on every host (default: here for SLURM; where the "
                            "container / VM starts otherwise)")
        s.add_argument("--out", help="where the job file goes (default: <name>.sbatch / .yaml / .sh)")
        if target == "slurm":
            s.add_argument("--time", help="time limit (SLURM format, e.g. 04:00:00)")
            s.add_argument("--partition")
            s.add_argument("--account")
            s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                           help="another #SBATCH line, e.g. --sbatch=--exclusive")
            s.add_argument("--submit", action="store_true", help="submit with sbatch and print the job id")
        elif target in ("k8s", "tpu-gke"):
            s.add_argument("--image", required=True, help="a container image with gptjax installed")
            s.add_argument("--namespace", default="default")
        if target == "tpu-gke":
            s.add_argument("--slices", type=int, default=1, help="TPU slices, joined over DCN (the run's "
                           "mesh.slices); --nodes is the hosts of one slice")
            s.add_argument("--accelerator", required=True, help="GKE's TPU accelerator, e.g. tpu-v5p-slice")
            s.add_argument("--topology", required=True, help="one slice's TPU topology, e.g. 4x4x4")
            s.add_argument("--chips-per-host", type=int, default=4)
        elif target == "k8s":
            s.add_argument("--volume-claim", help="a ReadWriteMany PersistentVolumeClaim for runs and data")
            s.add_argument("--mount", default="/shared", help="where the claim is mounted in every pod")
        elif target == "tpu-vm":
            s.add_argument("--tpu", required=True, help="the TPU VM's name")
            s.add_argument("--zone", required=True)
            s.add_argument("--project")
        s.add_argument("command", nargs=argparse.REMAINDER, help="-- then the gptjax command")
    return p


@console_script("gptjax-launch")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from gptjax.launch import (SLURM_LOGS, Job, LaunchError, SubmitError, k8s_manifest, slurm_script, submit,
                               tpu_jobset_manifest, tpu_vm_script, with_env)

    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    suffix = {"slurm": ".sbatch", "k8s": ".yaml", "tpu-gke": ".yaml", "tpu-vm": ".sh"}[a.target]
    with user_errors(LaunchError):
        job = with_env(Job(tuple(command), name=a.name, nodes=a.nodes, gpus_per_node=a.gpus_per_node, per=a.per,
                           processes_per_node=a.processes_per_node, grace_s=a.grace,
                           time=getattr(a, "time", None),
                           workdir=str(Path(a.workdir).resolve()) if a.workdir else None), a.env)
        if a.target == "slurm":
            text = slurm_script(job, a.partition, a.account, extra=tuple(a.sbatch))
        elif a.target == "k8s":
            import yaml

            text = f"# written by gptjax-launch k8s: {shlex.join(job.command)}\n" + yaml.safe_dump_all(
                k8s_manifest(job, a.image, a.namespace, a.volume_claim, a.mount), sort_keys=False)
        elif a.target == "tpu-gke":
            import yaml

            text = f"# written by gptjax-launch tpu-gke: {shlex.join(job.command)}\n" + yaml.safe_dump_all(
                tpu_jobset_manifest(job, a.image, a.slices, a.accelerator, a.topology, a.chips_per_host,
                                    a.namespace), sort_keys=False)
        else:
            text = tpu_vm_script(job, a.tpu, a.zone, a.project)
        out = Path(a.out or f"{job.name}{suffix}")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: directory {out.parent} does not exist")
        check_overwrite(out, lambda head: b"written by gptjax-launch" in head, "gptjax-launch")
        if a.target == "slurm" and a.submit and shutil.which("sbatch") is None:  # before anything is written
            raise UserError(f"--submit: sbatch not found, so nothing was written or submitted: run this on a SLURM "
                            f"login node (or tools/slurm_cluster up), or leave out --submit to write {out} only")
    out.write_text(text)
    out.chmod(0o755 if suffix != ".yaml" else 0o644)
    slices = getattr(a, "slices", 1)
    processes, hosts = job.processes * slices, job.nodes * slices
    print(f"wrote {out} ({processes} process{'es' * (processes > 1)} on {hosts} host{'s' * (hosts > 1)}"
          + (f" in {slices} slices" if slices > 1 else "") + ")", file=sys.stderr)
    if a.target == "slurm" and a.submit:
        Path(job.workdir or ".", SLURM_LOGS).mkdir(parents=True, exist_ok=True)  # sbatch does not create it
        try:
            print(submit(out))
        except SubmitError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
