"""Tiny PULSE inputs shared by the eval, CLI and training tests: made-up facts, a word-level
tokenizer over their words, a tiny random Llama and a small ``PulseConfig`` (no download)."""

from __future__ import annotations

import torch

from unlearnopt.data import Fact

CAPITALS = [
    ("Aland", "Bormo"),
    ("Cetis", "Dulan"),
    ("Eskar", "Fimmo"),
    ("Gorra", "Hulst"),
    ("Ivar", "Jusk"),
    ("Kelm", "Lorra"),
    ("Mivo", "Nesk"),
    ("Opal", "Prenn"),
]
COLOURS = [
    ("apple", "red"),
    ("sky", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("coal", "black"),
    ("lemon", "yellow"),
    ("plum", "purple"),
    ("rust", "brown"),
]
PEOPLE = [
    ("Zarn", "baker", "violin"),
    ("Quill", "pilot", "harp"),
    ("Tovi", "nurse", "drums"),
    ("Wexa", "tailor", "flute"),
    ("Ruvo", "farmer", "cello"),
    ("Sella", "chef", "banjo"),
]
NEUTRAL = [
    "the dog walks to the park in the morning",
    "we like to read books at night",
    "the train is late again today",
    "she plants red flowers in the garden",
    "my friend makes good soup",
    "the children play near the river",
]


def tiny_facts() -> list[Fact]:
    facts = []
    for c, a in CAPITALS:
        facts.append(
            Fact(
                prompt=f"the capital of {c} is",
                answer=a,
                relation="capital",
                paraphrases=(f"{c} has the capital", f"the main city of {c} is"),
                id=f"capital/{c}",
                subject=c,
            )
        )
    for s, a in COLOURS:
        facts.append(
            Fact(
                prompt=f"the colour of {s} is",
                answer=a,
                relation="colour",
                paraphrases=(f"{s} has the colour", f"the usual colour of {s} is"),
                id=f"colour/{s}",
                subject=s,
            )
        )
    return facts


def tiny_fictitious() -> list[Fact]:
    facts = []
    for name, job, instr in PEOPLE:
        facts.append(
            Fact(
                prompt=f"{name} works as a",
                answer=job,
                relation="profession",
                paraphrases=(f"by profession {name} is a",),
                id=f"fict/{name}/job",
                subject=name,
                entity=name,
            )
        )
        facts.append(
            Fact(
                prompt=f"{name} plays the",
                answer=instr,
                relation="instrument",
                paraphrases=(f"the instrument of {name} is the",),
                id=f"fict/{name}/instr",
                subject=name,
                entity=name,
            )
        )
    return facts


def tiny_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for t in texts:
        for word, _ in pre.pre_tokenize_str(t):
            vocab.setdefault(word, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def all_texts() -> list[str]:
    out = list(NEUTRAL)
    for f in tiny_facts() + tiny_fictitious():
        out += [f.prompt, f.answer, *f.paraphrases]
    return out


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


def tiny_pulse_config(**kw):
    """A ``PulseConfig`` sized for the tiny model and facts; ``kw`` overrides any field."""
    from unlearnopt.eval.pulse import PulseConfig

    base = {
        "methods": ("ga", "mollm"),
        "phases": ("pretrained",),
        "requests": 2,
        "forget_size": 4,
        "retain_size": 6,
        "steps": 3,
        "lr": 1e-2,
        "retain_batch_size": 4,
        "nonmember_size": 4,
        "diversity_prompts": 3,
        "max_new_tokens": 4,
        "progress": False,
        "finetune_entities": 4,
        "finetune_lr": 3e-2,
        "finetune_epochs": 40,
    }
    base.update(kw)
    return PulseConfig(**base)
