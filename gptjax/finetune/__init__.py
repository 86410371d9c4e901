"""Fine-tuning with task heads, as in GPT-1 (imports ``training`` and below): JSONL task data and GPT-1's input
transformations (``data``), the head, the auxiliary LM loss and the run (``trainer``), and a task built from the
embedded corpus (``novels``)."""

from gptjax.finetune import novels
from gptjax.finetune.data import TASK_TYPES, FinetuneDataError, encode, read_rows
from gptjax.finetune.trainer import FinetuneConfig, FinetuneError, FinetuneResult, Finetuner, finetune

__all__ = ["TASK_TYPES", "FinetuneConfig", "FinetuneDataError", "FinetuneError", "FinetuneResult", "Finetuner",
           "encode", "finetune", "novels", "read_rows"]
