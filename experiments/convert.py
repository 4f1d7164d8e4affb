"""Hugging Face MoE checkpoints in and out of moejax work dirs.

    # in: an HF model directory -> a work dir that experiments.train resumes
    python -m experiments.convert --hf_dir path/to/Mixtral-dir \
        --workdir runs/mixtral [--config configs/switch.py:tiny] \
        [--config.train.steps=100 ...]
    python -m experiments.train --workdir runs/mixtral   # fine-tunes it

    # out: a work dir's newest intact checkpoint -> an HF model directory
    python -m experiments.convert --to_hf out/mixtral --workdir runs/mixtral

    # LoRA: fold a fine-tuned run's adapters into its expert weights
    python -m experiments.convert --merge_lora runs/ft_merged \
        --workdir runs/ft_lora

In: the work dir gets `config.json`, a resolved run config whose `model`
section describes the imported model (`moejax.interop.hf_config`: every
model.* key, the rest at the base defaults, so the MoE is dropless:
capacity_factor and eval_capacity_factor None), and `checkpoints/0`, a
TrainState at step 0 with the imported params (and `moe_state`, e.g.
DeepSeek-V3's selection bias) and a fresh optimizer state, written with
the trainer's Checkpointer. The train, data, seed and mesh sections come
from --config, or else from configs/base.py's tiny sizes at a fine-tuning
learning rate (`DEFAULT_OVERRIDES`). With the synthetic mixture, the data's
vocabulary is lowered to the model's V when larger (its token ids must be
< V). `--config.<key>=<value>` overrides apply last, to any key (a model
key that changes a param shape is refused, naming the param).

Out: the stored config's model must map exactly onto one HF family (else
the refusal lists why: e.g. a capacity factor, tied embeddings, gelu).
The params and model state are read from the newest intact checkpoint
(not the optimizer state); the tensors of an imported, untrained model come
back bit for bit.

Merge: the newest intact checkpoint of a run with LoRA adapters
(finetune.lora_rank > 0) becomes a new work dir whose model has none: each
adapted kernel w becomes w + (lora_alpha / r) a . b (moejax.lora.merge_lora),
the config gets finetune.lora_rank=0 (and init / the other finetune keys
at their defaults), and `checkpoints/0` holds the merged params with a
fresh optimizer state: it evaluates, generates, exports (--to_hf) and
trains like any run, with the unmerged model's logits to float rounding.

Each direction ends with one line giving the conversion time and the peak
host memory (ru_maxrss). User errors print one line `error: ...` to stderr
and exit with code 2.
"""

from __future__ import annotations

import os
import shutil
import resource
import sys
import time
from typing import Optional, Sequence

import jax

from configs import base as base_config
from experiments import cli
from experiments import config_lib
from experiments import train as train_cli
from experiments import workdir_config
from moejax import lora as lora_lib
from moejax.interop import hf
from moejax.interop import hf_config
from moejax.train import checkpoint as checkpoint_lib
from moejax.train import loop
from moejax.train import state as state_lib

# Without --config: configs/base.py's tiny sizes, at a fine-tuning learning
# rate (tiny's 1e-2 is for training from scratch).
DEFAULT_OVERRIDES = {'train.learning_rate': 1e-4}
EXIT_USER_ERROR = cli.EXIT_USER_ERROR


EPILOG = """\
With --hf_dir, override any run config key with
--config.<dotted.key>=<value>.

exit codes:
  0  converted
  2  a user error: one line `error: ...` on stderr (a bad flag, a
     checkpoint or config that cannot be converted, an import into a
     --workdir that already holds checkpoints)"""

# Tokenizer files carried along by import and export.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json')


def parse_args(argv: Optional[Sequence[str]]):
  """(argparse namespace, {dotted key: value} of --config.<key> overrides).

  Args:
    argv: arguments without the program name (None: sys.argv[1:]).
  """
  parser = cli.Parser(
      prog='python -m experiments.convert',
      description=__doc__,  # the three directions, exit codes
      epilog=EPILOG)
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument('--hf_dir', help='HF model directory to import')
  direction.add_argument('--to_hf', metavar='DIR',
                         help='HF model directory to write (export)')
  direction.add_argument('--merge_lora', metavar='DIR',
                         help='new work dir: --workdir\'s LoRA adapters '
                              'folded into its weights')
  parser.add_argument('--workdir', required=True,
                      help='moejax work dir: written by an import, read by '
                           'an export')
  parser.add_argument('--config', default=None,
                      help='run config for the train / data settings of an '
                           'import, e.g. configs/switch.py:tiny (default: '
                           "configs/base.py's tiny sizes)")
  parser.add_argument('--fused_experts', action='store_true',
                      help='export: experts as fused gate_up_proj / '
                           'down_proj tensors (transformers 5 layout)')
  parser.add_argument('--max_shard_bytes', default=None, metavar='N',
                      type=cli.number(int, 'an int >= 1', lambda v: v >= 1),
                      help='export: split the safetensors into files of at '
                           'most this many bytes (plus an index)')
  args, rest = parser.parse_known_args(argv)
  overrides = train_cli.parse_overrides(parser, rest)
  if args.hf_dir is None and (overrides or args.config):
    parser.error('--config and --config.<key> apply to an import (--hf_dir);'
                 ' an export or merge uses the config stored in --workdir')
  return args, overrides


# ------------------------------------------------------------------- import
def import_config(hf_dir: str, spec: Optional[str], overrides: dict):
  """The validated run config of an imported model.

  Args:
    hf_dir: the HF model directory.
    spec: 'path[:variant]' of the train / data settings, or None.
    overrides: --config.<key> values, applied last.

  Returns:
    (ConfigDict, HF model_type).

  Raises:
    ValueError naming --hf_dir's problem or the config key.
  """
  hf_json = hf.read_config(hf_dir)
  kwargs = hf_config.model_kwargs(hf_json)  # UnsupportedConfigError
  if spec is None:
    config = config_lib.apply_overrides(base_config.sized_config('tiny', {}),
                                        DEFAULT_OVERRIDES)
  else:
    config = config_lib.load_config(spec)
  values = config_lib.model_overrides(kwargs)
  dtype = ('bfloat16' if str(hf.TensorReader(hf_dir).dtype()) == 'bfloat16'
           else 'float32')  # load_pretrained's rule: float16 -> float32
  values.update({'model.dtype': dtype, 'model.param_dtype': dtype})
  if config.data.name == 'synthetic_mixture':
    values['data.vocab_size'] = min(config.data.vocab_size,
                                    kwargs['vocab_size'])
  values.update(overrides)
  config = config_lib.apply_overrides(config, values)
  config_lib.validate_config(config)
  return config, hf_json['model_type']


def _abstract_variables(config, model) -> dict:
  """{'params', 'model_state'} ShapeDtypeStructs of the config's model."""
  optimizer, _ = config_lib.build_optimizer(config)
  abstract = state_lib.abstract_train_state(
      model, optimizer, (config.train.batch_size, config.data.seq_len))
  return {'params': abstract.params, 'model_state': abstract.model_state}


def import_hf(hf_dir: str, workdir: str, spec: Optional[str],
              overrides: dict) -> str:
  """Writes `workdir`'s config.json and step-0 checkpoint from `hf_dir`.

  Returns:
    A one-line description of what was imported.

  Raises:
    ValueError: a user error (named), nothing written.
  """
  if checkpoint_lib.checkpoint_steps(workdir):
    raise ValueError(f'--workdir {workdir} already holds checkpoints (a '
                     'run); allowed: a new or empty directory.')
  config, family = import_config(hf_dir, spec, overrides)
  model = config_lib.build_model(config)
  abstract = _abstract_variables(config, model)
  _, variables = hf.load_pretrained(
      hf_dir, dtype=config_lib.DTYPES[config.model.dtype],
      param_dtype=config_lib.DTYPES[config.model.param_dtype])
  imported = {'params': variables['params'],
              'model_state': {k: v for k, v in variables.items()
                              if k != 'params'}}
  problem = checkpoint_lib.variables_mismatch(imported, abstract)
  if problem:
    raise ValueError(f'the config overrides change the imported model: '
                     f'{problem}; allowed: overrides of keys that keep '
                     'every param shape.')
  _write_step0(workdir, config, imported['params'], imported['model_state'])
  copy_tokenizer(hf_dir, workdir)
  count = sum(x.size for x in jax.tree.leaves(imported['params']))
  return (f'{family} ({count:,} params, V={model.vocab_size}, dropless) -> '
          f'{workdir} (config.json, checkpoints/0); fine-tune it with: '
          f'python -m experiments.train --workdir {workdir}')


def copy_tokenizer(src: str, dst: str) -> list[str]:
  """Copies the HF tokenizer files of `src` (if any) into `dst`, so that
  `experiments.generate --prompt TEXT` finds tokenizer.json; returns the
  names copied."""
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied


# ------------------------------------------------------------------- export
def export_hf(workdir: str, out_dir: str, fused_experts: bool = False,
              max_shard_bytes: Optional[int] = None) -> str:
  """Writes `workdir`'s newest intact checkpoint as an HF model directory.

  Returns:
    A one-line description of what was exported.

  Raises:
    ValueError: a user error (named), nothing written.
  """
  if not os.path.isfile(os.path.join(workdir, workdir_config.CONFIG_FILE)):
    raise ValueError(f'--workdir {workdir} has no '
                     f'{workdir_config.CONFIG_FILE}; allowed: a moejax work '
                     'dir (made by experiments.train or an import).')
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ValueError(f'--to_hf {out_dir} is not empty; allowed: a new or '
                     'empty directory.')
  config = workdir_config.load_stored_config(workdir)
  config_lib.validate_config(config)
  model = config_lib.build_model(config)
  try:
    if model.task != 'lm':
      raise hf_config.UnsupportedConfigError(
          f"model.task={model.task!r} (HF families here are causal LMs: "
          "model.task='lm')")
    family = hf_config.hf_config(model)['model_type']
  except ValueError as e:
    raise ValueError(f'--workdir {workdir}: its model maps onto no '
                     f'supported HF family: {e}') from e
  try:
    step, variables = checkpoint_lib.restore_init_variables(
        workdir, _abstract_variables(config, model))
  except checkpoint_lib.InitSourceError as e:
    raise ValueError(f'--workdir {workdir} {e.reason}.') from e
  names = hf.save_pretrained(
      model, {'params': variables['params'], **variables['model_state']},
      out_dir, fused_experts=fused_experts, max_shard_bytes=max_shard_bytes)
  names += copy_tokenizer(workdir, out_dir)
  return (f'{workdir} (checkpoint {step}) -> {out_dir} as HF {family} '
          f'({", ".join(names)})')


# -------------------------------------------------------------------- merge
def merge_lora(workdir: str, out_dir: str) -> str:
  """Writes `out_dir`: `workdir`'s newest intact checkpoint with its LoRA
  adapters merged (see the module docstring).

  Returns:
    A one-line description.

  Raises:
    ValueError: a user error (named), nothing written.
  """
  if not os.path.isfile(os.path.join(workdir, workdir_config.CONFIG_FILE)):
    raise ValueError(f'--workdir {workdir} has no '
                     f'{workdir_config.CONFIG_FILE}; allowed: a moejax work '
                     'dir made by experiments.train.')
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ValueError(f'--merge_lora {out_dir} is not empty; allowed: a new '
                     'or empty directory.')
  config = workdir_config.load_stored_config(workdir)
  config_lib.validate_config(config)
  if not config.finetune.lora_rank:
    raise ValueError(f'--workdir {workdir} has no LoRA adapters '
                     '(finetune.lora_rank=0); allowed: a run with '
                     'finetune.lora_rank > 0.')
  model = config_lib.build_model(config)
  try:
    step, variables = checkpoint_lib.restore_init_variables(
        workdir, _abstract_variables(config, model))
  except checkpoint_lib.InitSourceError as e:
    raise ValueError(f'--workdir {workdir} {e.reason}.') from e
  merged_config = config_lib.apply_overrides(config, {
      **{f'finetune.{k}': v for k, v in
         base_config.get_base_config().finetune.items()},
      **{f'init.{k}': v for k, v in base_config.get_base_config().init.items()}})
  config_lib.validate_config(merged_config)
  params = lora_lib.merge_lora(jax.device_get(variables['params']),
                               config.finetune.lora_alpha)
  _write_step0(out_dir, merged_config, params, variables['model_state'])
  copy_tokenizer(workdir, out_dir)
  return (f'{workdir} (checkpoint {step}, LoRA rank '
          f'{config.finetune.lora_rank}) -> {out_dir} with the adapters '
          'merged (config.json, checkpoints/0)')


def _write_step0(workdir: str, config, params, model_state) -> None:
  """config.json and a step-0 checkpoint (fresh optimizer state)."""
  optimizer, _ = config_lib.build_optimizer(config)
  state = state_lib.state_from_variables(params, model_state, optimizer)
  os.makedirs(workdir, exist_ok=True)
  loop.write_config(workdir, config_lib.resolved_config(config))
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  try:
    checkpointer.save(state)
  finally:
    checkpointer.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs one direction; returns the exit code (0, or 2 on a user error)."""
  args, overrides = parse_args(argv)
  start = time.time()
  try:
    if args.hf_dir is not None:
      done = import_hf(args.hf_dir, args.workdir, args.config, overrides)
    elif args.merge_lora is not None:
      done = merge_lora(args.workdir, args.merge_lora)
    else:
      done = export_hf(args.workdir, args.to_hf, args.fused_experts,
                       args.max_shard_bytes)
  except ValueError as e:  # HfCheckpointError, UnsupportedConfigError too
    where = (f'--hf_dir {args.hf_dir}: ' if args.hf_dir is not None and
             isinstance(e, (hf.HfCheckpointError,
                            hf_config.UnsupportedConfigError)) else '')
    first = (str(e).strip().splitlines() or [''])[0]
    print(f'error: {where}{first}', file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
  print(f'converted {done}', flush=True)
  print(f'conversion time {time.time() - start:.1f}s, peak host memory '
        f'{peak:.0f} MiB', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
