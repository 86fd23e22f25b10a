"""Tiny random Hugging Face models built from configs (no download), for tests.

hidden 16-32, 2 layers, vocab ~100-300; dropout off so forward passes are deterministic.
``make_model(kind, dtype=torch.float32, seed=0)`` for kind in :data:`KINDS`:

- ``"llama"``, ``"gpt2"``, ``"qwen2"``: causal LMs (``AutoModelForCausalLM`` classes);
- ``"llava"``: ``LlavaForConditionalGeneration`` with a tiny CLIP vision tower and a tiny
  Llama text model; batches carry ``pixel_values`` and ``IMAGE_TOKENS`` image tokens;
- ``"lora"``: a PEFT LoRA wrapper (r = 4) around the tiny Llama; only adapters train.

Output-head variants (not in :data:`KINDS`; for the tests of the hidden-state path),
``make_model(kind)`` for kind in :data:`HEAD_KINDS`:

- ``"gemma2"``: Gemma-2 with final-logit soft-capping (cap 30); ``"gemma2_nocap"`` without;
- ``"cohere"``: logits times ``logit_scale`` (0.125); ``"granite"``: logits divided by
  ``logits_scaling`` (4), both Llama-shaped;
- ``"lora_head"``: LoRA on ``q_proj`` and on ``lm_head`` itself.

``make_batch(kind_or_model, batch=2, seq=8, seed=0)`` gives a Hugging Face batch dict
(``input_ids``, ``attention_mask``, ``labels`` with the first tokens set to -100 like a
prompt, ``pixel_values`` for llava).
"""

from __future__ import annotations

import torch

KINDS = ("llama", "gpt2", "qwen2", "llava", "lora")
HEAD_KINDS = ("gemma2", "gemma2_nocap", "cohere", "granite", "lora_head")
VOCAB = 128
HIDDEN = 32
IMAGE_TOKEN_ID = VOCAB - 1  # the LLaVA placeholder token, expanded by the batch maker
IMAGE_SIZE = 8
PATCH = 4
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # CLIP drops the CLS token with the default strategy


def _llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        **kw,
    )


def _build(kind: str):
    import transformers as tf

    if kind in ("llama", "lora"):
        model = tf.LlamaForCausalLM(_llama_config())
        if kind == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
                ),
            )
        return model
    if kind == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return tf.GPT2LMHeadModel(cfg)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        return tf.Qwen2ForCausalLM(cfg)
    if kind == "llava":
        vision = tf.CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            projection_dim=16,
        )
        cfg = tf.LlavaConfig(
            vision_config=vision,
            text_config=_llama_config(),
            image_token_index=IMAGE_TOKEN_ID,
            vision_feature_layer=-1,
        )
        return tf.LlavaForConditionalGeneration(cfg)
    if kind in HEAD_KINDS:
        return _build_head_variant(kind)
    raise ValueError(f"kind must be one of {KINDS + HEAD_KINDS}, got {kind!r}")


def _build_head_variant(kind: str):
    import transformers as tf

    shape = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "attention_dropout": 0.0,
    }
    if kind in ("gemma2", "gemma2_nocap"):
        cap = 30.0 if kind == "gemma2" else None
        return tf.Gemma2ForCausalLM(
            tf.Gemma2Config(head_dim=8, final_logit_softcapping=cap, **shape)
        )
    if kind == "cohere":
        return tf.CohereForCausalLM(tf.CohereConfig(logit_scale=0.125, **shape))
    if kind == "granite":
        return tf.GraniteForCausalLM(tf.GraniteConfig(logits_scaling=4.0, **shape))
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        tf.LlamaForCausalLM(_llama_config()),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "lm_head"]),
    )


def make_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised model of ``kind`` (see module docstring), in train mode."""
    torch.manual_seed(seed)
    model = _build(kind).to(dtype)
    model.train()
    return model


def perturb_lora(model: torch.nn.Module, std: float = 0.1, seed: int = 1) -> torch.nn.Module:
    """Give the LoRA ``B`` matrices (PEFT initialises them to 0) random values, so that the
    adapters change the output and ``A`` gets a gradient; no-op without LoRA."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(std * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def make_batch(
    kind: str,
    batch: int = 2,
    seq: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    prompt: int = 2,
) -> dict[str, torch.Tensor]:
    """A Hugging Face batch for ``kind``: ``input_ids`` / ``labels`` ``[B, T]``, the first
    ``prompt`` positions of every row ignored (-100), the last row padded by one token
    (attention 0, label -100) so padding is exercised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 1, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    if kind == "llava":
        ids[:, :IMAGE_TOKENS] = IMAGE_TOKEN_ID
        prompt = max(prompt, IMAGE_TOKENS + 1)
        out["pixel_values"] = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dtype)
    labels = ids.clone()
    labels[:, :prompt] = -100
    if batch > 1:
        mask[-1, -1] = 0
        labels[-1, -1] = -100
    out.update(input_ids=ids, attention_mask=mask, labels=labels)
    return out
