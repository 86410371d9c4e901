"""Launch a gptjax command on a cluster through the scheduler's own means and JAX's own cluster detection
(``jobs.py``: the job files for SLURM, Kubernetes, Cloud TPU VMs and multi-slice TPU JobSets on GKE, and the one
``sbatch`` submission)."""

from gptjax.launch.jobs import (ARRAY_INDEX, DISTRIBUTED, EXIT_PREEMPTED, PER, SLURM_LOGS, Job, LaunchError,
                                SubmitError, k8s_manifest, slurm_script, submit, tpu_jobset_manifest, tpu_vm_script,
                                with_env)

__all__ = ["ARRAY_INDEX", "DISTRIBUTED", "EXIT_PREEMPTED", "Job", "LaunchError", "PER", "SLURM_LOGS", "SubmitError",
           "k8s_manifest", "slurm_script", "submit", "tpu_jobset_manifest", "tpu_vm_script", "with_env"]
