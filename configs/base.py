"""Shared defaults of the dense / switch / gshard configs.

Every key a run may set lives here: `experiments.config_lib.validate_config`
rejects keys outside this tree and values whose type differs from the type
here (see `NULLABLE` for keys that may also be None). The three experiment
configs only change the `model.moe` block and pick a size variant. Every
`model.moe` key but `num_experts` is MoE-only: a dense config
(`num_experts=0`) must leave them at the defaults here.

The decoder options an imported checkpoint needs (`model.num_kv_heads`,
`model.head_dim`, `model.qk_norm`, `model.attn_bias`, `model.norm_eps`,
`model.rope_interleave`, `model.attention` with the `model.mla` block,
`model.dense_d_ff`, `model.sliding_window`, `model.vocab_size`,
`model.moe.dense_layers`, `model.moe.group_score`,
`model.moe.selection_bias`) default to today's models, bit for bit.
`experiments.convert` writes them from an HF config.json.

Variants (`SIZES`):
  tiny   L=64, D=64, F=128, 2 layers, E=4, B=16, 300 steps: a smoke run.
  small  L=128, D=128, F=256, 4 layers, E=8, B=8, 1000 steps: the research
         baseline (switch and gshard end below dense at equal steps).
"""

from __future__ import annotations

import ml_collections

# Keys whose value may be None besides the type of their default.
NULLABLE = {
    'data.data_dir': str,  # None -> ~/tensorflow_datasets
    'data.pad_id': int,  # None -> no padding token
    'model.moe.capacity_factor': float,  # None -> dropless
    'model.moe.eval_capacity_factor': float,
    'model.moe.group_size': int,  # None -> one group per sequence
    'model.moe.group_sequences': int,  # None -> group_size; -1 -> batch
    'model.moe.topk_groups': int,  # None -> every expert group selectable
    'model.moe.shared_d_ff': int,  # None -> d_ff // granularity
    'model.vocab_size': int,  # None -> the data's vocabulary (V)
    'model.num_kv_heads': int,  # None -> num_heads (no grouped-query)
    'model.head_dim': int,  # None -> d_model // num_heads
    'model.dense_d_ff': int,  # None -> d_ff
    'model.sliding_window': int,  # None -> every earlier position
    'model.mla.q_lora_rank': int,  # None -> a full-rank MLA query
    'distributed.coordinator_address': str,  # None -> auto-detect / 1 process
    'distributed.num_processes': int,  # None -> auto-detect
    'distributed.process_id': int,  # None -> auto-detect
}
# List keys whose items are strings (other lists hold ints).
STRING_LISTS = ('finetune.freeze', 'finetune.lora_targets')

SIZES = {
    'tiny': dict(
        train=dict(steps=300, batch_size=16, learning_rate=1e-2,
                   warmup_steps=30, log_every=25, eval_every=100,
                   checkpoint_every=100, eval_batches=4),
        data=dict(seq_len=64, example_len=65, num_train=8192, num_eval=256),
        model=dict(num_layers=2, d_model=64, num_heads=4, d_ff=128),
        moe=dict(num_experts=4)),
    'small': dict(
        train=dict(steps=1000, batch_size=8, learning_rate=3e-3,
                   warmup_steps=100, log_every=50, eval_every=250,
                   checkpoint_every=250, eval_batches=8),
        data=dict(seq_len=128, example_len=129, num_train=20000,
                  num_eval=512),
        model=dict(num_layers=4, d_model=128, num_heads=4, d_ff=256),
        moe=dict(num_experts=8)),
}


def get_base_config() -> ml_collections.ConfigDict:
  """The full key tree with defaults (a dense model of the 'tiny' size).

  Returns:
    ConfigDict with sections `train`, `data`, `model` (and `model.moe`,
    `model.mla`), `init`, `finetune`, `mesh`, `distributed`, plus the
    top-level `seed`.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0  # init params and the per-step RNG; also the data shuffle seed
  c.train = ml_collections.ConfigDict(dict(
      steps=300, batch_size=16, learning_rate=1e-2, warmup_steps=30,
      min_lr_ratio=0.1,  # cosine decays to learning_rate * min_lr_ratio
      weight_decay=0.1, grad_clip=1.0, b1=0.9, b2=0.95,
      log_every=25, eval_every=100, checkpoint_every=100,
      keep_checkpoints=2, eval_batches=4,
      # M > 1: each step's batch_size rows in M micro-batches of
      # batch_size / M, gradients summed (memory of one micro-batch, update
      # of the whole batch; moejax/train/accumulate.py). Routing groups,
      # the 'batch' balance loss and the loss-free bias keep the whole
      # batch's meaning.
      grad_accum_steps=1,
      # True: params stored in model.param_dtype='bfloat16' keep float32
      # master copies in the optimizer state (moejax/train/optim.py).
      master_weights=False))
  c.data = ml_collections.ConfigDict(dict(
      # | 'local_text' | 'python_stdlib' (this Python's standard library,
      # byte tokens, 8 domains: moejax/data/stdlib_text.py) | a prepared
      # TFDS name
      name='synthetic_mixture',
      data_dir=None, seq_len=64,
      example_len=65,  # stored tokens per example (>= seq_len + 1)
      train_split='train', eval_split='validation',
      # synthetic_mixture generator
      num_domains=8, vocab_size=256, support=8, alpha=0.5, seed=0,
      num_train=8192, num_eval=256,
      # local_text: glob of text files; TFDS: text feature name
      pattern='', text_key='text',
      pad_id=None,  # token id ignored by the loss (e.g. 0 for TFDS text)
      # synthetic_mixture / python_stdlib: keep only these domain ids in
      # both splits ([]: all), e.g. pretrain on some domains and fine-tune
      # on the others.
      domains=[]))
  c.model = ml_collections.ConfigDict(dict(
      # 'lm': decoder TransformerLM (next token); 'classify': bidirectional
      # EncoderClassifier of each example's domain id (non-causal routers).
      task='lm',
      num_layers=2, d_model=64, num_heads=4, d_ff=128, activation='gelu',
      tie_embeddings=True, rope_base=1e4, dtype='float32',
      param_dtype='float32',
      # Decoder options of imported checkpoints (moejax.interop.hf); the
      # defaults are the models above. vocab_size None: the data's V.
      vocab_size=None, num_kv_heads=None, head_dim=None,
      qk_norm='none',  # | 'head' (Qwen3) | 'full' (OLMoE)
      attn_bias=False,  # q, k, v projection biases (Qwen2)
      norm_eps=1e-6,  # every RMSNorm (HF rms_norm_eps)
      rope_interleave=False,  # RoPE pairs (2j, 2j+1) (DeepSeek)
      attention='mha',  # | 'mla' (DeepSeek multi-head latent attention)
      dense_d_ff=None,  # dense FFN blocks' width (None: d_ff)
      sliding_window=None))  # None, or >= data.seq_len (Mixtral)
  # MLA sizes (attention='mla' only; 0 = unused, every one >= 1 with MLA).
  c.model.mla = ml_collections.ConfigDict(dict(
      q_lora_rank=None, kv_lora_rank=0, qk_nope_head_dim=0,
      qk_rope_head_dim=0, v_head_dim=0))
  # MoeLayer arguments (see moejax/layers.py for each one's meaning).
  c.model.moe = ml_collections.ConfigDict(dict(
      num_experts=0,  # 0: dense
      top_k=1, capacity_factor=1.25, eval_capacity_factor=2.0,
      min_capacity=4, capacity_multiple_of=1,
      router='topk',  # | 'relu' | 'expert_choice' | 'soft_moe' (classify)
      score_fn='softmax',  # | 'sigmoid' (DeepSeek-V3)
      dispatcher='gather', priority='choice', renormalize=False,
      routed_scaling=1.0, second_expert_policy='all',
      second_expert_threshold=0.2, jitter_eps=0.0,
      # DeepSeek-V3: group-limited selection and loss-free balancing speed.
      num_groups=1, topk_groups=None, bias_update_rate=0.0,
      # Fine-grained experts (m*E of width F/m, m*K chosen) and shared ones.
      granularity=1, num_shared_experts=0, shared_d_ff=None,
      shared_gate=False,
      slots_per_expert=1, soft_normalize=False,  # Soft MoE
      # ReMoE (router='relu'; top_k = the target active experts): the L1
      # controller's factor, initial coefficient, load-balancing L1 form.
      relu_l1_alpha=1.2, relu_l1_init=1e-8, relu_l1_balance=False,
      # Zero-compute null experts in the top-K choice (router='topk').
      num_null_experts=0,
      # Routing groups: None = one per sequence; group_size=k * seq_len or
      # group_sequences=k (k whole sequences, whatever length the MoE rows
      # have: Lc in Mixture-of-Depths blocks; -1: the whole batch) with
      # group_order='position' = Switch/GShard's groups of k documents,
      # position-major (causal-safe; moejax/grouping.py).
      group_size=None, group_sequences=None, group_order='sequence',
      moe_every=1, first_dense_layers=0,
      dense_layers=[],  # further always-dense blocks (Qwen mlp_only_layers)
      # DeepSeek-V2 scores a group by its best expert ('max'); V3's fixed
      # e_score_correction_bias is a selection bias in 'moe_state'.
      group_score='top2_sum', selection_bias=False,
      # priority='score', and priority='choice' with >= 2 choices per token
      # and a capacity, let a token's routing see later tokens: a causal LM
      # refuses them unless this is True.
      allow_noncausal_routing=False,
      aux_loss_weight=0.01, z_loss_weight=0.0,
      # The load-balance loss per routing group ('group': Switch) or over
      # the step's whole global batch ('batch': Qiu et al. 2025).
      aux_loss_scope='group'))
  # Mixture-of-Depths (moejax.models.mod; task='lm' only): every = 0 off,
  # k: blocks k-1, 2k-1, ... process the top `capacity` fraction of each
  # sequence's tokens; the predictor ('mlp' | 'router') makes the causal
  # decode-time choice, trained by BCE with weight aux_weight; decisions
  # 'topk' (training) | 'predictor' (the forward pass decoding matches).
  c.model.mod = ml_collections.ConfigDict(dict(
      every=0, capacity=0.125, predictor='mlp', predictor_hidden=64,
      aux_weight=0.01, decisions='topk'))
  # Where step 0's params come from: '' = a fresh init from `seed`; a
  # moejax work dir = its latest good checkpoint's params and model state
  # (not its optimizer state; the run starts at step 0). Only a run without
  # checkpoints of its own uses it (a resume ignores it).
  # init.upcycle: the source is a dense run and this config an MoE: every
  # expert of an MoE block starts as a copy of the source block's FFN, the
  # router fresh ('fresh') or zero ('zero': uniform routing), the rest
  # copied (sparse upcycling); upcycle_noise adds Gaussian noise of that
  # relative std to each copy, drop_upcycle_ratio re-draws that fraction of
  # each expert's hidden units (Drop-Upcycling). README "Upcycle and
  # fine-tune".
  c.init = ml_collections.ConfigDict(dict(
      from_workdir='', upcycle=False, upcycle_router='fresh',
      upcycle_noise=0.0, drop_upcycle_ratio=0.0))
  # What trains (moejax.train.finetune): freeze = regular expressions over
  # param paths ('block_0/.*', '.*/attn/.*'); freeze_router: the routers'
  # params; freeze_bias: the loss-free balancing bias stops moving (kept as
  # a fixed selection bias). lora_rank > 0: only low-rank adapters train,
  # on lora_targets ('experts' = routed expert banks, 'shared' = shared
  # experts, 'dense' = dense FFN blocks), scaled by lora_alpha / lora_rank.
  # train_experts='topk_used' (ESFT): measure each MoE layer's expert loads
  # on esft_batches training batches, train only the fewest experts that
  # take esft_fraction of the routed tokens, freeze everything else.
  c.finetune = ml_collections.ConfigDict(dict(
      freeze=[], freeze_router=False, freeze_bias=False,
      lora_rank=0, lora_alpha=16.0, lora_targets=['experts'],
      train_experts='all', esft_fraction=0.9, esft_batches=8))
  # Device mesh ('data', 'expert', 'model'); one size may be -1 (all the
  # remaining devices). The batch is split over data x expert, the experts
  # over expert, expert / FFN hidden widths and heads over model. It sets
  # where arrays live, not what is computed (README "Scaling out").
  c.mesh = ml_collections.ConfigDict(dict(data=1, expert=1, model=1))
  # Several processes (hosts): jax.distributed.initialize runs first when
  # initialize=True or coordinator_address is set. Unset values are
  # auto-detected (TPU pod slices, SLURM, Open MPI; JAX_COORDINATOR_ADDRESS).
  # Default: one process, no initialisation.
  c.distributed = ml_collections.ConfigDict(dict(
      initialize=False,
      coordinator_address=None,  # 'host:port' of process 0
      num_processes=None, process_id=None))
  return c


def sized_config(variant, moe_overrides: dict) -> ml_collections.ConfigDict:
  """Base config resized to a variant, with MoE settings on top.

  Args:
    variant: 'tiny' | 'small' (None -> 'tiny').
    moe_overrides: `model.moe` values set after the size (e.g. top_k;
      num_experts=0 for dense).

  Returns:
    The filled ConfigDict.
  """
  variant = variant or 'tiny'
  if variant not in SIZES:
    raise ValueError(f'config variant {variant!r} is not supported; allowed '
                     f'values: {", ".join(map(repr, SIZES))}.')
  c = get_base_config()
  size = SIZES[variant]
  for section in ('train', 'data', 'model'):
    c[section].update(size[section])
  c.model.moe.update(size['moe'])
  c.model.moe.update(moe_overrides)
  return c
