r"""Planned by gptjax-plan: the compute-optimal run at C = 1e+12 FLOPs of experiments/results/isoflop/fit.json.

    gptjax-plan --flops 1e12 --fit experiments/results/isoflop/fit.json --config \
        runs/isoflop/C2e11_N40936/config.json --out experiments/plan_C1e12.py

C = 1e+12 FLOPs (approach 3, 95% bootstrap intervals)
  N_opt = 69,155 [30,223, 96,323]   D_opt = 2,410,054 [1,730,294, 5,514,578]   loss there = 1.6742 [1.6096, 1.8013]
the run: N = 68,376 (non-embedding), D = 2,437,632 tokens -> predicted val_loss 1.6742 [1.6175, 1.8215]
  shape  sizing rule at N_opt = 69,155: d_model 56, 2 layers, d_ff 128 (N = 68,376)
  tokens C / (6 N) = 1e+12 / (6 x 68,376) -> 4,761 steps x 4 x 128 = 2,437,632
  batch  the sweep's 4 sequences
  lr     0.003, the sweep's one lr for every size (standard parametrisation: not re-tuned for this width; μP would
         transfer it)
  mesh   first of data / fsdp / fsdp x tensor over 1 device(s) whose analytic memory fits
  model  56 wide x 2 layers, 7 heads, d_ff 128 (88,088 parameters with the embedding), standard
  train  4,761 steps x 4 x 128, lr 0.003, warmup 237, cosine
  mesh   data=1 x fsdp=1 x context=1 x tensor=1 on 1 cpu: 0.009 GB per device (analytic) of 25 GB
         compiled check: 0.013 GB per device (XLA:CPU, fits)
  time   1.7e+12 training FLOPs / (1 x 0.009532 TFLOP/s) = 3.0 min; throughput: measured by
         runs/isoflop/C2e11_N40936: 21,235 tokens/s x 448,896 FLOPs/token

Train it (its summary reports the measured against the predicted loss):

    gptjax-train --config experiments/plan_C1e12.py
"""

from gptjax import RunConfig

CONFIG = {'data': {'corpus': 'default',
          'doc_pattern': None,
          'document_masking': None,
          'mixture': {},
          'seed': 0,
          'tokenizer': 'runs/isoflop/tokenizer.model',
          'tokenizer_sample_chars': 20000000,
          'val_fraction': 0.05},
 'mesh': {'context': 1,
          'context_strategy': 'gather',
          'data': 1,
          'fsdp': 1,
          'rules': {},
          'sharding_factor': None,
          'tensor': 1},
 'model': {'attention': 'dense',
           'attention_block': 512,
           'attention_impl': 'auto',
           'd_ff': 128,
           'd_model': 56,
           'dtype': 'float32',
           'head_dim': None,
           'init_std': 0.02,
           'loss_chunk': 0,
           'max_seq_len': 128,
           'mlp': 'swiglu',
           'mup_base_width': 256,
           'n_heads': 7,
           'n_kv_heads': None,
           'n_layers': 2,
           'norm': 'rmsnorm',
           'norm_eps': 1e-05,
           'param_dtype': 'float32',
           'parametrization': 'standard',
           'positions': 'rope',
           'qk_norm': False,
           'qkv_bias': None,
           'remat': 'none',
           'rope_theta': 10000.0,
           'scan_layers': False,
           'tie_embeddings': True,
           'use_bias': False,
           'vocab_size': 352,
           'window': 256,
           'z_loss': 0.0},
 'optim': {'b1': 0.9,
           'b2': 0.95,
           'decay_fraction': 0.2,
           'eps': 1e-08,
           'grad_clip': 1.0,
           'lr': 0.003,
           'min_lr_ratio': 0.1,
           'schedule': 'cosine',
           'schedule_steps': None,
           'warmup_steps': 237,
           'weight_decay': 0.1},
 'train': {'async_checkpoint': False,
           'batch_size': 4,
           'checkpoint_every': 1190,
           'eval_batches': 64,
           'eval_every': 1190,
           'final_task_examples': 200,
           'init_from': None,
           'keep_checkpoints': 10,
           'log_every': 397,
           'max_nonfinite_skips': 3,
           'peak_flops': 100000000000.0,
           'prediction': {'approach': '3',
                          'fit': 'experiments/results/isoflop/fit.json',
                          'flops': 1000000000000.0,
                          'interval': [1.6175240297237423, 1.821542810252067],
                          'loss': 1.674188506695809,
                          'params': 68376,
                          'tokens': 2437632,
                          'wall_seconds': 178.7},
           'progress': False,
           'run_dir': 'runs/plan_C1e12',
           'sample_prompt': 'It is a truth universally acknowledged',
           'sample_tokens': 0,
           'seed': 0,
           'seq_len': 128,
           'steps': 4761,
           'task_eval_every': 100,
           'task_examples': 64,
           'task_shots': 2,
           'tasks': ''}}


def config() -> RunConfig:
    return RunConfig.from_dict(CONFIG)


if __name__ == "__main__":
    from gptjax.training import train

    train(config())
