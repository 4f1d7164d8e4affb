"""Checkpoints of other frameworks in and out of moejax.

  moejax.interop.hf   Hugging Face MoE families (Mixtral, Qwen2-MoE,
                      Qwen3-MoE, OLMoE, DeepSeek-V2/V3): load_pretrained,
                      save_pretrained (safetensors, no torch).
"""
