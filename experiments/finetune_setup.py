"""The `init` (upcycling) and `finetune` config blocks: checks and start.

    python -m experiments.train --config configs/upcycle.py:tiny \
        --workdir runs/upcycled --init_from runs/dense_tiny
    python -m experiments.train --config configs/finetune.py:lora \
        --workdir runs/ft_lora --init_from runs/switch_old_domains

Static checks (`check_config`, part of `config_lib.validate_config`) name
the key and the allowed values. `check_start` compares the source work
dir's checkpoint with this run's model from metadata alone (nothing read,
nothing compiled). `prepare_start` then writes the run's step-0
checkpoint when the start needs more than a plain restore:

  * init.upcycle: the dense source's params mapped into the MoE
    (moejax.train.upcycle), then the function-preservation check: the
    step-0 MoE's and the dense source's eval loss on the eval batches;
  * finetune.lora_rank > 0 from a source without adapters: the source's
    params plus freshly initialised adapters (B = 0: the same function);
  * finetune.train_experts='topk_used' (ESFT): each MoE layer's expert
    loads on the first esft_batches training batches, and the experts
    chosen from them, saved in `<workdir>/esft_experts.json` (a resume
    reads them back: the optimizer's layout depends on them).

The training loop then resumes from that checkpoint; a plain
init.from_workdir without these is restored by the loop itself.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.config_keys import require as _require
from moejax import sharding
from moejax.analysis import routing_capture
from moejax.train import checkpoint as checkpoint_lib
from moejax.train import finetune
from moejax.train import init_source
from moejax.train import state as state_lib
from moejax.train import upcycle as upcycle_lib

LORA_TARGETS = ('experts', 'shared', 'dense')
TRAIN_EXPERTS = ('all', 'topk_used')
ESFT_FILE = 'esft_experts.json'
UPCYCLE_OPTIONS = (('upcycle_router', 'fresh'), ('upcycle_noise', 0.0),
                   ('drop_upcycle_ratio', 0.0))


def _allowed(values) -> str:
  return ', '.join(map(repr, values))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Ranges and combinations of init.* and finetune.*; raises ValueError
  naming the key."""
  i, moe = config.init, config.model.moe
  if i.upcycle:
    _require('init.upcycle', True, bool(i.from_workdir),
             'False, or True with init.from_workdir (--init_from) set to '
             'the dense run')
    _require('init.upcycle', True, moe.num_experts > 0,
             'False, or True with an MoE config (model.moe.num_experts > 0)')
  else:
    for key, default in UPCYCLE_OPTIONS:
      _require(f'init.{key}', i[key], i[key] == default,
               f'{default!r} unless init.upcycle=True')
  _require('init.upcycle_router', i.upcycle_router,
           i.upcycle_router in upcycle_lib.ROUTER_INITS,
           _allowed(upcycle_lib.ROUTER_INITS))
  _require('init.upcycle_noise', i.upcycle_noise, i.upcycle_noise >= 0,
           '>= 0')
  _require('init.drop_upcycle_ratio', i.drop_upcycle_ratio,
           0 <= i.drop_upcycle_ratio <= 1, '[0, 1]')
  _check_finetune(config)


def _check_finetune(config: ml_collections.ConfigDict) -> None:
  f, moe = config.finetune, config.model.moe
  _require('finetune.lora_rank', f.lora_rank, f.lora_rank >= 0,
           '0 (no adapters) or an int >= 1')
  _require('finetune.lora_alpha', f.lora_alpha, f.lora_alpha > 0, '> 0')
  bad = [t for t in f.lora_targets if t not in LORA_TARGETS]
  _require('finetune.lora_targets', list(f.lora_targets),
           bool(f.lora_targets) and not bad,
           f'a non-empty list of {_allowed(LORA_TARGETS)}')
  _require('finetune.train_experts', f.train_experts,
           f.train_experts in TRAIN_EXPERTS, _allowed(TRAIN_EXPERTS))
  _require('finetune.esft_fraction', f.esft_fraction,
           0 < f.esft_fraction <= 1, '(0, 1]')
  _require('finetune.esft_batches', f.esft_batches, f.esft_batches >= 1,
           'an int >= 1')
  for pattern in f.freeze:
    try:
      re.compile(pattern)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'finetune.freeze: {pattern!r} is not a regular '
                       f'expression ({e}).') from e
  _require('finetune.lora_rank', f.lora_rank,
           f.lora_rank == 0 or config.model.task == 'lm',
           "0, or model.task='lm' (adapters are on the decoder's FFNs)")
  dense = moe.num_experts == 0
  for key in ('freeze_router', 'freeze_bias'):
    _require(f'finetune.{key}', f[key], not (f[key] and dense),
             'False for a dense model (model.moe.num_experts=0)')
  _require('finetune.freeze_bias', f.freeze_bias,
           not f.freeze_bias or moe.bias_update_rate > 0,
           'False, or True with model.moe.bias_update_rate > 0 (a bias '
           'that moves)')
  if f.train_experts == 'topk_used':
    _require('finetune.train_experts', f.train_experts,
             not dense and moe.router == 'topk',
             "'all' unless the model has token-choice MoE layers "
             "(model.moe.router='topk')")
    _require('finetune.train_experts', f.train_experts, f.lora_rank == 0,
             "'all' with finetune.lora_rank > 0 (choose one method)")


def plan(config: ml_collections.ConfigDict,
         expert_rows: Optional[dict] = None
         ) -> Optional[finetune.FinetunePlan]:
  """The FinetunePlan of a config (None: everything trains).

  Args:
    config: the run config.
    expert_rows: ESFT's {layer path: expert ids} (finetune.train_experts=
      'topk_used'; see `esft_rows`).
  """
  f = config.get('finetune')
  if f is None:
    return None
  esft = f.train_experts == 'topk_used'
  if esft and expert_rows is None:
    raise ValueError("finetune.train_experts='topk_used' needs the chosen "
                     'experts (esft_rows) to build the optimizer.')
  result = finetune.FinetunePlan(
      freeze=tuple(f.freeze), freeze_router=f.freeze_router,
      lora_only=f.lora_rank > 0,
      expert_rows=({k: tuple(v) for k, v in expert_rows.items()} if esft
                   else None))
  return None if result.trains_everything else result


def needs_prepared_start(config: ml_collections.ConfigDict) -> bool:
  """Whether a fresh run starts from a step-0 checkpoint `prepare_start`
  writes (upcycling, adapters added to a source, ESFT)."""
  i, f = config.init, config.finetune
  return bool(i.upcycle or (i.from_workdir and f.lora_rank > 0) or
              f.train_experts == 'topk_used')


def _variables(abstract_state) -> dict:
  return {'params': abstract_state.params,
          'model_state': abstract_state.model_state}


def graft(source: dict, target: dict) -> dict:
  """`source`'s variables in `target`'s tree: every leaf copied by path;
  target leaves the source lacks must be LoRA adapters (kept from
  `target`). Raises ValueError naming the first leaf that does not fit."""
  src = checkpoint_lib.variable_table(source)

  def fill(path, leaf):
    name = finetune.path_name(path)
    if name in src:
      if tuple(src[name].shape) != tuple(leaf.shape):
        raise ValueError(f'{name} has shape {tuple(src[name].shape)} in the '
                         f'source but {tuple(leaf.shape)} in this model')
      return src[name]
    if not finetune.is_lora(name):
      raise ValueError(f'{name} (shape {tuple(leaf.shape)}) is not in the '
                       'source')
    return leaf

  out = jax.tree_util.tree_map_with_path(fill, dict(target))
  extra = sorted(set(src) - set(checkpoint_lib.variable_table(target)))
  if extra:
    raise ValueError(f'the source holds {extra[0]}, which this model lacks')
  return out


def _init_error(config, reason: str) -> ValueError:
  key = 'init.upcycle' if config.init.upcycle else 'init.from_workdir'
  return ValueError(f'{key}: the source {config.init.from_workdir!r} does '
                    f'not fit this model: {reason}.')


def check_start(config: ml_collections.ConfigDict, abstract_state,
                fresh_start: bool) -> None:
  """Checks the finetune block against the model's params and, for a fresh
  prepared start, the init source against the model, from metadata only.

  Args:
    config: the validated config.
    abstract_state: the model's abstract TrainState (any optimizer).
    fresh_start: the run has no checkpoint of its own (or --fresh).

  Raises:
    ValueError naming the finetune / init key.
  """
  params = abstract_state.params
  f = config.finetune
  static = finetune.FinetunePlan(freeze=tuple(f.freeze),
                                 freeze_router=f.freeze_router,
                                 lora_only=f.lora_rank > 0)
  finetune.check_plan(params, static)
  if not (fresh_start and config.init.from_workdir and
          needs_prepared_start(config)):
    return
  try:
    source = init_source.saved_abstract(config.init.from_workdir)
  except checkpoint_lib.InitSourceError as e:
    key = 'init.upcycle' if config.init.upcycle else 'init.from_workdir'
    raise ValueError(f'{key}: the source {e.workdir!r} {e.reason}; allowed: '
                     'a moejax work dir with a checkpoint.') from e
  try:
    if config.init.upcycle:
      upcycle_lib.upcycle_plan(source['params'], params)
    else:
      graft(source, _variables(abstract_state))
  except ValueError as e:
    raise _init_error(config, str(e)) from e


def load_expert_rows(workdir: str) -> Optional[dict]:
  """ESFT's {layer path: expert ids} saved in `workdir`, or None."""
  path = os.path.join(workdir, ESFT_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as fp:
    layers = json.load(fp)['layers']
  return {layer: tuple(v['experts']) for layer, v in layers.items()}


def esft_rows(config: ml_collections.ConfigDict, model, variables: dict,
              train_loader) -> tuple[dict, dict]:
  """ESFT-Token expert choice from the first esft_batches train batches.

  Returns:
    ({layer path: chosen expert ids}, {layer path: [E] routed counts}):
    per MoE layer, every valid token's K choices counted per expert (eval
    mode), and `finetune.esft_select` of the counts.
  """
  f, pad_id = config.finetune, config.data.pad_id
  flat = {'params': variables['params'], **variables['model_state']}
  counts = {}
  for t in range(f.esft_batches):
    tokens = np.asarray(train_loader.batch(t)['tokens'])[:, :-1]
    mask = None if pad_id is None else tokens == pad_id
    for layer, r in routing_capture.capture_routing(
        model, flat, tokens, mask).items():
      valid = np.ones(tokens.shape, bool) if mask is None else ~mask
      chosen = r.expert_index[valid].reshape(-1)
      e = r.logits.shape[-1]
      counts[f'{layer}/ffn'] = counts.get(f'{layer}/ffn', 0) + np.bincount(
          chosen, minlength=e)
  rows = {layer: finetune.esft_select(c, f.esft_fraction)
          for layer, c in counts.items()}
  return rows, counts


def save_expert_rows(workdir: str, rows: dict, counts: dict,
                     config: ml_collections.ConfigDict) -> str:
  """Writes ESFT_FILE (atomically); returns its path."""
  path = os.path.join(workdir, ESFT_FILE)
  record = {'fraction': config.finetune.esft_fraction,
            'batches': config.finetune.esft_batches,
            'layers': {layer: {'experts': list(rows[layer]),
                               'counts': [int(c) for c in counts[layer]]}
                       for layer in rows}}
  os.makedirs(workdir, exist_ok=True)
  with open(path + '.tmp', 'w', encoding='utf-8') as fp:
    json.dump(record, fp, indent=1)
  os.replace(path + '.tmp', path)
  return path


def _fresh_variables(config, model, input_shape) -> dict:
  """The model's init from the run seed ({'params', 'model_state'})."""
  tokens = jnp.zeros(input_shape, jnp.int32)
  variables = flax.core.unfreeze(jax.jit(
      lambda rng: model.init({'params': rng}, tokens, deterministic=True))(
          state_lib.init_rng(config.seed)))
  return {'params': variables.pop('params'), 'model_state': variables}


def start_variables(config, model, input_shape
                    ) -> tuple[dict, str, Optional[dict]]:
  """Step-0 variables of a prepared start, what they are (one line), and
  the source's restored variables (None without a source)."""
  target = _fresh_variables(config, model, input_shape)
  source_dir, i = config.init.from_workdir, config.init
  if not source_dir:
    return target, f'init: fresh params from seed {config.seed}', None
  step, source = init_source.restore_init_variables(
      source_dir, init_source.saved_abstract(source_dir))
  if i.upcycle:
    params = upcycle_lib.upcycle_params(
        source['params'], target['params'], router=i.upcycle_router,
        noise=i.upcycle_noise, drop_ratio=i.drop_upcycle_ratio,
        seed=config.seed)
    return ({'params': params, 'model_state': target['model_state']},
            f'init: upcycled the dense {source_dir} (checkpoint {step}): '
            f'experts copied from its FFNs, router {i.upcycle_router}, '
            f'noise {i.upcycle_noise}, drop ratio {i.drop_upcycle_ratio}',
            source)
  grafted = graft(source, target)
  grafted = jax.tree.map(lambda s, t: np.asarray(s).astype(t.dtype),
                         grafted, target)
  return grafted, (f'init: params and model state of {source_dir} '
                   f'(checkpoint {step}) plus fresh LoRA adapters (B = 0)'
                   if config.finetune.lora_rank else
                   f'init: params and model state of {source_dir} '
                   f'(checkpoint {step})'), source


def _eval_loss(config, model, variables: dict, eval_data) -> dict:
  """The loop's eval record of `variables` on the eval batches (one
  device, deterministic: the eval capacity factor)."""
  from moejax.train import loop  # pylint: disable=g-import-not-at-top
  from moejax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  eval_step = step_lib.make_eval_step(model, pad_id=config.data.pad_id)
  batches = [{k: b[k] for k in ('tokens', 'optimal_nll') if k in b}
             for b in eval_data]
  return loop.evaluate(eval_step, variables['params'], batches, 0,
                       variables['model_state'] or None)


def preservation_report(config, model, variables: dict, source: dict,
                        eval_data) -> str:
  """One line: the upcycled model's step-0 eval loss against the dense
  source's (`source`: its restored variables), and why they differ when
  they do."""
  from experiments import config_lib  # pylint: disable=g-import-not-at-top
  from experiments import workdir_config  # pylint: disable=g-import-not-at-top
  source_dir = config.init.from_workdir
  source_config = workdir_config.load_stored_config(source_dir)
  source_model = config_lib.build_model(source_config)
  dense = _eval_loss(config, source_model, source, eval_data)['eval/loss']
  moe_record = _eval_loss(config, model, variables, eval_data)
  moe, drops = moe_record['eval/loss'], moe_record['eval/drop_fraction']
  diff = abs(moe - dense)
  head = (f'upcycle check: step-0 eval loss {moe:.6f}, the dense source\'s '
          f'{dense:.6f} (|diff| {diff:.1e})')
  reasons = []
  m, i = config.model.moe, config.init
  if not m.renormalize:
    reasons.append('model.moe.renormalize=False (gates do not sum to 1)')
  if drops > 0:
    reasons.append(f'eval drop fraction {drops:.3f} (capacity)')
  if i.upcycle_noise or i.drop_upcycle_ratio:
    reasons.append('upcycle_noise / drop_upcycle_ratio (experts differ)')
  if m.num_shared_experts or m.routed_scaling != 1.0:
    reasons.append('shared experts / routed_scaling')
  if not reasons and diff <= 1e-4 * max(1.0, abs(dense)):
    return head + ': the dense function is preserved'
  return head + ': not preserved: ' + ('; '.join(reasons) or
                                       'unexpected: please report')


def prepare_start(config, workdir: str, model, mesh, train_loader,
                  eval_data, log=print) -> Optional[dict]:
  """Writes the step-0 checkpoint of a prepared start (see module doc).

  Args:
    config: the validated config (`needs_prepared_start`).
    workdir: the run's (empty of checkpoints) work dir.
    model: the run's model.
    mesh: the run's mesh.
    train_loader: the run's train loader (ESFT reads its first batches).
    eval_data: the eval batches (the upcycling check).
    log: prints a line.

  Returns:
    ESFT's {layer path: expert ids} (saved in ESFT_FILE), or None.
  """
  from experiments import config_lib  # pylint: disable=g-import-not-at-top
  input_shape = (train_loader.batch_size, train_loader.seq_len)
  variables, what, source = start_variables(config, model, input_shape)
  log(what)
  if config.init.upcycle:
    log(preservation_report(config, model, variables, source, eval_data))
  rows = None
  if config.finetune.train_experts == 'topk_used':
    rows, counts = esft_rows(config, model, variables, train_loader)
    if jax.process_index() == 0:
      save_expert_rows(workdir, rows, counts, config)
    log('ESFT: trains experts ' + '; '.join(
        f'{layer} {list(r)}' for layer, r in rows.items()) +
        f' (>= {config.finetune.esft_fraction} of the routed tokens of '
        f'{config.finetune.esft_batches} batches; {ESFT_FILE})')
  optimizer, _ = config_lib.build_optimizer(config, rows)
  abstract = state_lib.abstract_train_state(model, optimizer, input_shape,
                                            mesh)
  shardings = sharding.tree_shardings(abstract, mesh)
  params = jax.device_put(variables['params'], shardings.params)
  model_state = jax.device_put(variables['model_state'],
                               shardings.model_state)
  state = state_lib.state_from_variables(params, model_state, optimizer,
                                         shardings, mesh)
  checkpointer = checkpoint_lib.Checkpointer(
      workdir, config.train.keep_checkpoints,
      config=config_lib.resolved_config(config))
  try:
    checkpointer.save(state)
  finally:
    checkpointer.close()
  return rows


def start_optimizer(config, workdir: str, prepared: bool, model, mesh,
                    train_loader, eval_data, log=print):
  """The run's optimizer and schedule, after writing a prepared start's
  step-0 checkpoint (`prepared`), with ESFT's chosen experts (chosen now,
  or read back from ESFT_FILE on a resume); logs what trains.

  Raises:
    ValueError: an ESFT run's checkpoints without ESFT_FILE.
    InitSourceError: the source has no intact checkpoint.
  """
  from experiments import config_lib  # pylint: disable=g-import-not-at-top
  rows = None
  if prepared:
    rows = prepare_start(config, workdir, model, mesh, train_loader,
                         eval_data, log=lambda m: print(m, flush=True))
  elif config.finetune.train_experts == 'topk_used':
    rows = load_expert_rows(workdir)
    if rows is None:
      raise ValueError(
          f"finetune.train_experts='topk_used': {workdir} has checkpoints "
          f'but no {ESFT_FILE} (the experts its optimizer trains); allowed: '
          'restore the file, or --fresh to choose them again.')
  optimizer, schedule = config_lib.build_optimizer(config, rows)
  the_plan = plan(config, rows)
  if the_plan is not None:
    log(trainable_summary(config, model, optimizer, the_plan,
                          (train_loader.batch_size, train_loader.seq_len)))
  return optimizer, schedule


def trainable_summary(config, model, optimizer, the_plan,
                      input_shape) -> str:
  """'finetune: 1,234 of 56,789 params train (2.2%); optimizer state
  0.01 MiB (training everything: 0.43 MiB)'."""
  from experiments import config_lib  # pylint: disable=g-import-not-at-top
  full, _ = config_lib.build_optimizer(
      ml_collections.ConfigDict({**config.to_dict(), 'finetune': dict(
          config.finetune.to_dict(), freeze=[], freeze_router=False,
          lora_rank=0, train_experts='all')}))
  abstract = state_lib.abstract_train_state(model, optimizer, input_shape)
  ref = jax.eval_shape(full.init, abstract.params)
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  trains = finetune.trainable_count(abstract.params, the_plan)
  mib = lambda tree: state_lib.tree_bytes(tree) / 2**20
  return (f'finetune: {trains:,} of {total:,} params train '
          f'({100 * trains / max(total, 1):.2f}%); optimizer state '
          f'{mib(abstract.opt_state):.3f} MiB (training everything: '
          f'{mib(ref):.3f} MiB)')
