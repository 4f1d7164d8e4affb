"""Fine-tuning a trained MoE on held-out domains of the synthetic mixture.

`pretrain` trains the Switch model on domains 0-5 only; the fine-tuning
variants start from that run (--init_from) and train on domains 6-7, each
with one method:

  full           every param trains;
  frozen_router  the routers' params are frozen (the learned routing kept);
  lora           only rank-8 adapters on the expert FFNs train
                 (finetune.lora_rank; Hu et al. 2021 on the experts);
  esft           only the fewest experts per layer that receive 90% of the
                 new domains' routed tokens train (ESFT-Token, Wang et al.
                 2024); everything else is frozen.

Run (from the repository root):

    python -m experiments.train --config configs/finetune.py:tiny,pretrain \
        --workdir runs/ft_pretrain_tiny
    python -m experiments.train --config configs/finetune.py:tiny,lora \
        --workdir runs/ft_lora_tiny --init_from runs/ft_pretrain_tiny

Variant: 'SIZE,METHOD' with SIZE 'tiny' (default) | 'small' and METHOD
'pretrain' | 'full' (default) | 'frozen_router' | 'lora' | 'esft'. The
table of all methods (new-domain loss, old-domain loss kept, trainable
params, optimizer memory):
`python -m experiments.finetune_baselines --part finetune`.
"""

from configs import base

OLD_DOMAINS = [0, 1, 2, 3, 4, 5]
NEW_DOMAINS = [6, 7]
METHODS = {
    'pretrain': {},
    'full': {},
    'frozen_router': {'finetune.freeze_router': True},
    'lora': {'finetune.lora_rank': 8, 'finetune.lora_alpha': 16.0},
    'esft': {'finetune.train_experts': 'topk_used',
             'finetune.esft_fraction': 0.9},
}
# Fine-tuning steps and learning rates per size: a third of the
# pretraining steps; LoRA's adapters take the pretraining peak rate, the
# methods that move pretrained weights a third of it.
FINETUNE = {'tiny': dict(steps=100, eval_every=50, checkpoint_every=50,
                         log_every=10),
            'small': dict(steps=300, eval_every=100, checkpoint_every=100,
                          log_every=25)}


def _parse(arg):
  parts = [p for p in (arg or '').split(',') if p]
  size = [p for p in parts if p in base.SIZES] or ['tiny']
  method = [p for p in parts if p in METHODS] or ['full']
  unknown = [p for p in parts if p not in base.SIZES and p not in METHODS]
  if unknown or len(size) > 1 or len(method) > 1:
    raise ValueError(
        f'config variant {arg!r} is not supported; allowed values: '
        f'SIZE,METHOD with SIZE in {", ".join(map(repr, base.SIZES))} and '
        f'METHOD in {", ".join(map(repr, METHODS))}.')
  return size[0], method[0]


def get_config(arg=None):
  """The Switch model, pretraining on domains 0-5 or fine-tuning on 6-7.

  Args:
    arg: 'SIZE,METHOD' (see the module docstring; None -> 'tiny,full').

  Returns:
    ml_collections.ConfigDict.
  """
  size, method = _parse(arg)
  c = base.sized_config(size, dict(
      top_k=1, capacity_factor=1.25, eval_capacity_factor=2.0,
      aux_loss_weight=0.01))
  # Enough eval examples for train.eval_batches after keeping 2 of 8
  # domains (every variant, so all share one dataset).
  c.data.num_eval = 2048
  if method == 'pretrain':
    c.data.domains = list(OLD_DOMAINS)
    return c
  c.data.domains = list(NEW_DOMAINS)
  c.train.update(FINETUNE[size])
  c.train.warmup_steps = c.train.steps // 10
  if method != 'lora':
    c.train.learning_rate = c.train.learning_rate / 3
  for key, value in METHODS[method].items():
    section, name = key.split('.')
    c[section][name] = value
  return c
