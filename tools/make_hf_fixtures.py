"""Make tiny random Hugging Face MoE checkpoints for the JAX logits-parity tests.

For each family (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3,
deepseek_v3_plain_q, deepseek_v2) this builds a tiny float32 model with
``AutoModelForCausalLM.from_config``, re-initialises every weight at a larger
scale than HF's default (so the parity check means something), and writes into
``<out>/<family>/``:

* ``config.json``, ``generation_config.json`` and ``model.safetensors``
  (``save_pretrained(..., safe_serialization=True)``; transformers 5 writes the
  legacy per-expert layout, e.g. ``mlp.experts.0.gate_proj.weight``, not the
  fused in-memory ``experts.gate_up_proj``);
* ``reference.npz``: ``input_ids`` int32 [2, 12], ``logits`` float32
  [2, 12, V] (HF forward), ``greedy`` int32 [2, 28] (``generate`` with the KV
  cache, 16 new tokens, no EOS stop) and ``router_logits_layer<i>`` float32
  [24, E] for each MoE decoder layer ``i``.

The model seed is chosen (first seed from 0 upward) so that every routing
decision has a margin of at least 1e-3 in the score used for the top-k
selection (and between kept and dropped groups for group-limited routing), on
the reference inputs and on the full greedy sequences, and so that the greedy
arg-max at each generated position wins by at least 1e-3 in logit units.  A
JAX re-implementation that agrees with HF to ~1e-5 therefore picks the same
experts and the same tokens.

``qwen3_moe`` also gets a tiny byte-level BPE ``tokenizer.json`` (trained here
on a few hundred bytes of text), ``prompt.txt`` ("the cat") and, in its
``reference.npz``, ``prompt_ids`` int32 [1, n] and ``prompt_greedy`` int32
[1, n + 16].  ``<out>/VERSIONS.json`` records the torch / transformers versions,
the seeds and the margins.

CI does not run this script (CI has no torch); its outputs are committed.
Regenerate with (torch CPU + transformers + safetensors + tokenizers in a side
venv)::

    /work/torchenv/bin/python tools/make_hf_fixtures.py --out tests/fixtures/hf

Nothing is downloaded: everything is built from configs (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

try:  # only in transformers versions that ship DeepSeek-V2
    from transformers import DeepseekV2Config
except ImportError:  # pragma: no cover
    DeepseekV2Config = None

BATCH, SEQ, NEW_TOKENS = 2, 12, 16
MARGIN = 1e-3  # minimum routing-score / greedy-logit gap
MAX_SEEDS = 200

# Re-initialisation scales (HF's default is normal(0, 0.02) and ones for norms).
STD_MATRIX = 0.15  # every weight matrix, embeddings and lm_head included
STD_ROUTER = 0.25  # router weight [E, D]: logits ~ N(0, (0.25 * sqrt(64))^2 = 2^2)
STD_BIAS = 0.1  # linear biases (Qwen2-MoE q/k/v)
STD_NORM = 0.1  # RMSNorm weights are 1 + 0.1 * normal
STD_SCORE_BIAS = 0.1  # DeepSeek-V3 e_score_correction_bias

PROMPT = "the cat"
TOKENIZER_TEXT = (
    "the cat sat on the mat. the cat saw the dog and the dog saw the cat. "
    "a cat and a dog sat in the sun; the sun was warm and the mat was soft. "
    "then the cat ran to the tree, and the dog ran after the cat. "
    "the bird in the tree sang a song to the cat, the dog and the sun. "
    "at night the cat slept on the mat and the dog slept by the door. "
    "in the morning the cat ate fish, the dog ate meat, the bird ate seeds. "
    "The Cat, the Dog and the Bird: 3 friends, 2 legs or 4 legs, 1 home!\n"
)

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_attention_heads=4,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    use_cache=True,
)


# --------------------------------------------------------------------------- configs


def cfg_mixtral():
    return MixtralConfig(
        **COMMON,
        intermediate_size=48,
        num_hidden_layers=3,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-5,
        sliding_window=None,
        router_jitter_noise=0.0,
    ), "softmax"


def cfg_qwen2_moe():
    return Qwen2MoeConfig(
        **COMMON,
        intermediate_size=96,  # dense MLP of layer 0
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_hidden_layers=3,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        qkv_bias=True,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-6,
    ), "softmax"


def cfg_qwen3_moe(vocab_size):
    common = dict(COMMON, vocab_size=vocab_size)
    return Qwen3MoeConfig(
        **common,
        head_dim=32,  # != 64 / 4
        intermediate_size=48,  # dense MLP of layers 0 and 2
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=2,  # layers 1 and 3 are MoE
        mlp_only_layers=[],
        attention_bias=False,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-6,
    ), "softmax"


def cfg_olmoe():
    return OlmoeConfig(
        **COMMON,
        intermediate_size=32,  # OLMoE experts use intermediate_size
        num_hidden_layers=3,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        clip_qkv=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        rms_norm_eps=1e-5,
    ), "softmax"


def cfg_deepseek_v3(q_lora_rank=32, n_shared_experts=1):
    return DeepseekV3Config(
        **COMMON,
        num_key_value_heads=4,  # MLA: must equal num_attention_heads
        intermediate_size=96,  # dense layer 0
        moe_intermediate_size=32,
        num_hidden_layers=3,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=n_shared_experts,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},  # i.e. rope_scaling=None
        rms_norm_eps=1e-6,
    ), "sigmoid_group"


def cfg_deepseek_v2():
    return DeepseekV2Config(
        **COMMON,
        num_key_value_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        topk_method="group_limited_greedy",
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.0,
        norm_topk_prob=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        rms_norm_eps=1e-6,
    ), "softmax_group_max"


# --------------------------------------------------------------------------- helpers


def build(config, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    model = model.float().eval()
    reinit_(model, seed)
    return model


@torch.no_grad()
def reinit_(model, seed):
    g = torch.Generator().manual_seed(10_000 + seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    for name, p in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        leaf = module_name.rsplit(".", 1)[-1]
        if leaf.endswith("norm") and name.endswith(".weight"):
            p.copy_(1.0 + normal(p.shape, STD_NORM))
        elif name.endswith("mlp.gate.weight"):  # router
            p.copy_(normal(p.shape, STD_ROUTER))
        elif name.endswith(".bias"):
            p.copy_(normal(p.shape, STD_BIAS))
        elif p.ndim >= 2:
            p.copy_(normal(p.shape, STD_MATRIX))
        else:
            raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(normal(b.shape, STD_SCORE_BIAS))


def moe_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _kth_gap(scores, k):
    """Gap between the k-th and (k+1)-th largest entry of each row."""
    top = torch.topk(scores, k + 1, dim=-1).values
    return top[:, k - 1] - top[:, k]


def routing_margins(router_logits, kind, cfg, layer_mods):
    """Per MoE layer: (min top-k gap, min group gap or None)."""
    k = cfg.num_experts_per_tok
    out = []
    for logits, mod in zip(router_logits, layer_mods):
        logits = logits.float()
        group_gap = None
        if kind == "softmax":
            scores = torch.softmax(logits, dim=-1)
        elif kind == "sigmoid_group":
            scores = logits.sigmoid() + mod.mlp.gate.e_score_correction_bias.float()
            e = scores.shape[-1]
            grouped = scores.view(-1, cfg.n_group, e // cfg.n_group)
            gscore = grouped.topk(2, dim=-1).values.sum(-1)
        elif kind == "softmax_group_max":
            scores = torch.softmax(logits, dim=-1)
            e = scores.shape[-1]
            grouped = scores.view(-1, cfg.n_group, e // cfg.n_group)
            gscore = grouped.max(dim=-1).values
        else:
            raise ValueError(kind)
        if kind != "softmax":
            if cfg.topk_group < cfg.n_group:
                group_gap = _kth_gap(gscore, cfg.topk_group).min().item()
            keep = torch.zeros_like(gscore).scatter_(1, gscore.topk(cfg.topk_group, dim=-1).indices, 1.0)
            keep = keep.bool().unsqueeze(-1).expand_as(grouped).reshape(scores.shape)
            scores = scores.masked_fill(~keep, float("-inf"))
        out.append((_kth_gap(scores, k).min().item(), group_gap))
    return out


def min_margin(margins):
    vals = [m for pair in margins for m in pair if m is not None]
    return min(vals)


@torch.no_grad()
def forward(model, ids):
    return model(input_ids=ids, output_router_logits=True, use_cache=False)


@torch.no_grad()
def greedy(model, ids, use_cache=True):
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=0,  # never used: no sequence finishes early
        use_cache=use_cache,
    )


def greedy_gap(model, seq, prompt_len):
    """Min top1 - top2 logit gap at each position that produced a generated token."""
    logits = forward(model, seq).logits[:, prompt_len - 1 : -1].float()
    top = torch.topk(logits, 2, dim=-1)
    agree = torch.equal(top.indices[..., 0], seq[:, prompt_len:])
    return (top.values[..., 0] - top.values[..., 1]).min().item(), agree


def train_tokenizer(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    assert tok.get_vocab_size() <= vocab_size, tok.get_vocab_size()
    return tok


# --------------------------------------------------------------------------- main


def make_family(name, config_fn, out_dir, extra_prompts=None):
    config, kind = config_fn()
    # Fixed inputs, independent of the model seed.
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=g, dtype=torch.int64)

    for seed in range(MAX_SEEDS):
        model = build(config, seed)
        layers = moe_layers(model)
        mods = [model.model.layers[i] for i in layers]
        out = forward(model, input_ids)
        assert len(out.router_logits) == len(layers), (len(out.router_logits), layers)
        margins = routing_margins(out.router_logits, kind, config, mods)
        gen = greedy(model, input_ids)
        # Decode steps route too: check the margins on the full sequences.
        margins_full = routing_margins(forward(model, gen).router_logits, kind, config, mods)
        ggap, agree = greedy_gap(model, gen, SEQ)
        checks = [min_margin(margins), min_margin(margins_full), ggap]
        prompt_out = {}
        for key, ids in (extra_prompts or {}).items():
            pgen = greedy(model, ids)
            pm = routing_margins(forward(model, pgen).router_logits, kind, config, mods)
            pgap, pagree = greedy_gap(model, pgen, ids.shape[1])
            checks += [min_margin(pm), pgap]
            agree = agree and pagree
            prompt_out[key] = (ids, pgen)
        ok = min(checks) >= MARGIN and agree
        extra = f", prompt route margin / logit gap {checks[3]:.2e} / {checks[4]:.2e}" if prompt_out else ""
        print(
            f"{name}: seed {seed}: min route margin (ref / greedy seq) "
            f"{checks[0]:.2e} / {checks[1]:.2e}, greedy logit gap {ggap:.2e}{extra}, "
            f"cache/full argmax agree {agree} -> {'ok' if ok else 'retry'}"
        )
        if ok:
            break
    else:
        raise RuntimeError(f"{name}: no seed in range({MAX_SEEDS}) gives margins >= {MARGIN}")

    # KV-cache generation must agree with cache-less generation.
    assert torch.equal(gen, greedy(model, input_ids, use_cache=False)), name

    fam_dir = out_dir / name
    if fam_dir.exists():
        shutil.rmtree(fam_dir)
    fam_dir.mkdir(parents=True)
    model.save_pretrained(fam_dir, safe_serialization=True)

    ref = {
        "input_ids": input_ids.numpy().astype(np.int32),
        "logits": out.logits.float().numpy().astype(np.float32),
        "greedy": gen.numpy().astype(np.int32),
    }
    for i, rl in zip(layers, out.router_logits):
        ref[f"router_logits_layer{i}"] = rl.float().numpy().astype(np.float32)
    for key, (ids, pgen) in prompt_out.items():
        ref[f"{key}_ids"] = ids.numpy().astype(np.int32)
        ref[f"{key}_greedy"] = pgen.numpy().astype(np.int32)

    # Round trip: the saved checkpoint reproduces the reference logits.
    reloaded = AutoModelForCausalLM.from_pretrained(
        fam_dir, local_files_only=True, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    diff = (forward(reloaded, input_ids).logits - out.logits).abs().max().item()
    assert diff < 1e-5, (name, diff)

    np.savez(fam_dir / "reference.npz", **ref)
    size = sum(f.stat().st_size for f in fam_dir.iterdir())
    print(f"{name}: wrote {fam_dir} ({size / 1024:.0f} KiB), MoE layers {layers}, reload diff {diff:.1e}")
    info = {
        "seed": seed,
        "seeds_tried": seed + 1,
        "moe_layers": layers,
        "routing": kind,
        "min_route_margin_ref": checks[0],
        "min_route_margin_greedy_seq": checks[1],
        "min_greedy_logit_gap": ggap,
        "bytes": size,
    }
    if prompt_out:
        info["min_route_margin_prompt_seq"], info["min_greedy_logit_gap_prompt"] = checks[3], checks[4]
    if hasattr(config, "rope_interleave"):
        info["rope_interleave"] = config.rope_interleave
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/hf"))
    ap.add_argument("--only", nargs="*", help="families to (re)build; default all")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    args.out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(288)
    qwen3_vocab = 288
    prompt_ids = torch.tensor([tok.encode(PROMPT).ids], dtype=torch.int64)

    families = {
        "mixtral": (cfg_mixtral, None),
        "qwen2_moe": (cfg_qwen2_moe, None),
        "qwen3_moe": (lambda: cfg_qwen3_moe(qwen3_vocab), {"prompt": prompt_ids}),
        "olmoe": (cfg_olmoe, None),
        "deepseek_v3": (cfg_deepseek_v3, None),
        "deepseek_v3_plain_q": (lambda: cfg_deepseek_v3(q_lora_rank=None, n_shared_experts=2), None),
    }
    skipped = {}
    if DeepseekV2Config is not None and "topk_method" in DeepseekV2Config.__dataclass_fields__:
        families["deepseek_v2"] = (cfg_deepseek_v2, None)
    else:
        skipped["deepseek_v2"] = "DeepseekV2Config with topk_method not in this transformers"
        print("deepseek_v2: skipped (no DeepseekV2Config with topk_method)")

    versions_path = args.out / "VERSIONS.json"
    record = json.loads(versions_path.read_text())["families"] if versions_path.exists() else {}
    for name, (fn, prompts) in families.items():
        if args.only and name not in args.only:
            continue
        record[name] = make_family(name, fn, args.out, prompts)
        if name == "qwen3_moe":
            fam_dir = args.out / name
            tok.save(str(fam_dir / "tokenizer.json"))
            (fam_dir / "prompt.txt").write_text(PROMPT)
            record[name]["prompt"] = PROMPT
            record[name]["prompt_ids"] = prompt_ids[0].tolist()
            record[name]["tokenizer_vocab_size"] = tok.get_vocab_size()

    import safetensors
    import tokenizers

    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "margin": MARGIN,
        "init": {
            "matrix_std": STD_MATRIX,
            "router_std": STD_ROUTER,
            "bias_std": STD_BIAS,
            "norm": f"1 + {STD_NORM} * normal",
            "e_score_correction_bias_std": STD_SCORE_BIAS,
        },
        "inputs": "torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1234))",
        "families": record,
        "skipped": skipped,
    }
    versions_path.write_text(json.dumps(versions, indent=2, sort_keys=False) + "\n")
    print(f"wrote {versions_path}")


if __name__ == "__main__":
    main()
