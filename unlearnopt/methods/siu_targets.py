"""SIU's constructed fine-tuning targets (arXiv 2405.12523).

For one concept to forget, SIU fine-tunes on a small constructed batch with four aims:

1. *align with an unseen concept*: questions about the concept are answered with a
   fictitious name ("Who is this?" -> "This is Jacob Smith .");
2. *assign a new description*: the concept's description is replaced by a new one;
3. *decouple factual knowledge*: facts that should survive stay as targets;
4. *preserve non-targeted knowledge*: other concepts keep their answers.

All four are targets of the cross-entropy term. The dual masked KL (DMK) term compares the
model with the frozen original on the same batch, with two masks built here:

- ``token_mask`` ``[B, T]`` bool, in the frame of ``labels`` (unshifted, like the labels; the
  objective shifts both): True on the answer tokens of aims (3) and (4), False on the answer
  tokens of aims (1) and (2) (their targets are deliberately different from the original
  model's), on prompts and on padding. So DMK keeps the model close to the original exactly
  where the original's answers are still wanted.
- ``vocab_mask`` ``[V]`` bool: False on the token ids of the concept's real name (every
  tokenisation variant in ``name_variants``), True elsewhere, so the KL never pulls
  probability back onto the name.

:func:`build_siu_targets` returns a Hugging Face batch dict::

    input_ids       [B, T] int64   prompt + answer (+ eos), right-padded
    attention_mask  [B, T] int64
    labels          [B, T] int64   answer tokens (and eos); -100 on prompt and padding
    token_mask      [B, T] bool    see above (labels frame)
    vocab_mask      [V]    bool    see above
    siu_aim         [B]    int64   1..4, the aim of each row
    pixel_values    [I, C, H, W]   only for image+text batches: one image per row that has
                                   one, in row order (LLaVA's convention)

``token_mask``, ``vocab_mask`` and ``siu_aim`` are not model inputs: :data:`SIU_EXTRA_KEYS`
names them, and :func:`model_inputs` drops them before a forward pass.

Rows are ordered aim 1, 2, 3, 4; inside an aim in the order given. Prompts and answers are
tokenised separately (prompt with the tokenizer's special tokens, answer without) and
concatenated, so the label boundary is exact for any tokenizer. Placeholders ``{concept}``,
``{name}`` and ``{fictitious_name}`` in every prompt, answer and template are replaced
literally (other braces are left alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

SIU_EXTRA_KEYS = ("token_mask", "vocab_mask", "siu_aim")
AIM_ALIGN, AIM_DESCRIBE, AIM_FACTS, AIM_PRESERVE = 1, 2, 3, 4
IGNORE_INDEX = -100


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` without the SIU-only keys (``token_mask``, ``vocab_mask``, ``siu_aim``)."""
    return {k: v for k, v in batch.items() if k not in SIU_EXTRA_KEYS}


def _fill(text: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    out = tokenizer(text, add_special_tokens=special)["input_ids"]
    return list(out)


def name_token_ids(tokenizer, variants: Sequence[str]) -> list[int]:
    """Sorted token ids of every variant of the name, special tokens excluded."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids: set[int] = set()
    for variant in variants:
        ids.update(i for i in _ids(tokenizer, variant, special=False) if i not in special)
    return sorted(ids)


def _check_pairs(name: str, pairs) -> list[tuple]:
    out = []
    for i, item in enumerate(pairs):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(
                f"{name}[{i}] must be (prompt, answer) or (prompt, answer, image), got {item!r}"
            )
        if not all(isinstance(s, str) for s in item[:2]):
            raise TypeError(f"{name}[{i}]: prompt and answer must be str, got {item!r}")
        out.append(tuple(item))
    return out


def _check_image(name: str, image) -> torch.Tensor | None:
    if image is None:
        return None
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name} must be a [C, H, W] tensor, got {shape}")
    return image


def build_siu_targets(
    tokenizer,
    *,
    name: str,
    fictitious_name: str,
    questions: Sequence[str],
    concept: str | None = None,
    answer_template: str = "This is {fictitious_name} .",
    description: str | None = None,
    description_questions: Sequence[str] = ("Describe {concept} .",),
    facts: Sequence[tuple] = (),
    preserved: Sequence[tuple] = (),
    image: torch.Tensor | None = None,
    prompt_template: str = "{image}{prompt}",
    image_token: str | None = None,
    image_seq_length: int = 1,
    name_variants: Sequence[str] | None = None,
    vocab_size: int | None = None,
    add_eos: bool = True,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Build SIU's four-aim batch for one concept (see the module docstring for the layout).

    Args:
        tokenizer: any Hugging Face tokenizer (``PreTrainedTokenizerBase``).
        name: the concept's real name; its token ids get ``vocab_mask = False``.
        fictitious_name: the unseen name that replaces it in aims (1) and (2).
        questions: aim (1) prompts, e.g. ``"Who is {concept} ?"``; each is answered with
            ``answer_template``.
        concept: how prompts refer to the concept (``{concept}``); default ``name``; for an
            image, e.g. ``"the person in the image"``.
        answer_template: aim (1) answer, e.g. ``"This is {fictitious_name} ."``.
        description: aim (2) new description (e.g. ``"{fictitious_name} is a baker ."``);
            None: no aim (2) rows.
        description_questions: aim (2) prompts, each answered with ``description``.
        facts: aim (3) ``(prompt, answer)`` pairs about the concept that must survive.
        preserved: aim (4) ``(prompt, answer)`` or ``(prompt, answer, image [C, H, W])``
            about other concepts.
        image: ``[C, H, W]`` image of the concept, used by the rows of aims (1)-(3); None
            for a text-only batch.
        prompt_template: wraps every prompt; ``{image}`` becomes ``image_seq_length`` copies
            of ``image_token`` on rows with an image and nothing otherwise, ``{prompt}`` the
            prompt (e.g. ``"USER: {image}\\n{prompt} ASSISTANT:"`` for LLaVA).
        image_token: the tokenizer's image placeholder token (required with images).
        image_seq_length: how many image tokens one image occupies (LLaVA: the number of
            patch features, e.g. 576; the processor would expand it the same way).
        name_variants: strings whose tokens are masked in the vocabulary; default
            ``(name, " " + name)`` (BPE tokenizers give a leading-space word another id).
        vocab_size: length of ``vocab_mask``; default ``len(tokenizer)``. Pass the model's
            ``config.vocab_size`` when its embedding is larger than the tokenizer.
        add_eos: append ``tokenizer.eos_token_id`` to every answer (as a target).
        max_length: truncate rows to this many tokens (from the right); None: no limit.

    Returns:
        the batch dict described in the module docstring.

    Example (``tok`` is any Hugging Face tokenizer, so the doctest run skips it):
        >>> batch = build_siu_targets(  # doctest: +SKIP
        ...     tok, name="donald trump", fictitious_name="jacob smith",
        ...     questions=["who is {concept} ?"],
        ...     description="{fictitious_name} is a baker from ohio .",
        ...     preserved=[("who is joe biden ?", "joe biden")])
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not isinstance(fictitious_name, str) or not fictitious_name.strip():
        raise ValueError(f"fictitious_name must be a non-empty string, got {fictitious_name!r}")
    if isinstance(questions, str):
        raise TypeError("questions must be a sequence of strings, got a single str")
    if isinstance(description_questions, str):
        raise TypeError("description_questions must be a sequence of strings, got a single str")
    if not isinstance(image_seq_length, int) or image_seq_length < 1:
        raise ValueError(f"image_seq_length must be a positive int, got {image_seq_length!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
    image = _check_image("image", image)
    facts = _check_pairs("facts", facts)
    preserved = _check_pairs("preserved", preserved)
    for i, item in enumerate(preserved):
        if len(item) == 3:
            _check_image(f"preserved[{i}] image", item[2])

    values = {
        "concept": concept if concept is not None else name,
        "name": name,
        "fictitious_name": fictitious_name,
    }
    # (prompt, answer, image, aim) per row, in aim order.
    rows: list[tuple[str, str, torch.Tensor | None, int]] = []
    answer = _fill(answer_template, values)
    rows += [(_fill(q, values), answer, image, AIM_ALIGN) for q in questions]
    if description is not None:
        text = _fill(description, values)
        rows += [(_fill(q, values), text, image, AIM_DESCRIBE) for q in description_questions]
    rows += [(_fill(p, values), _fill(a, values), image, AIM_FACTS) for p, a, *_ in facts]
    rows += [
        (
            _fill(item[0], values),
            _fill(item[1], values),
            item[2] if len(item) == 3 else None,
            AIM_PRESERVE,
        )
        for item in preserved
    ]
    if not rows:
        raise ValueError(
            "nothing to build: questions, description, facts and preserved are all empty"
        )
    if any(r[2] is not None for r in rows) and image_token is None:
        raise ValueError(
            "image_token is required when an image is given (it marks where the "
            "image features go in the prompt)"
        )
    if "{prompt}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{prompt}}', got {prompt_template!r}")

    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
    sequences, label_rows, mask_rows, images = [], [], [], []
    for prompt, target, row_image, aim in rows:
        image_text = (image_token * image_seq_length) if row_image is not None else ""
        full_prompt = _fill(prompt_template, {"image": image_text, "prompt": prompt})
        prompt_ids = _ids(tokenizer, full_prompt, special=True)
        answer_ids = _ids(tokenizer, target, special=False) + ([eos] if add_eos else [])
        if not answer_ids:
            raise ValueError(f"the answer {target!r} tokenises to nothing")
        ids = prompt_ids + answer_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        keep_in_kl = aim in (AIM_FACTS, AIM_PRESERVE)
        token_mask = [False] * len(prompt_ids) + [keep_in_kl] * len(answer_ids)
        if max_length is not None:
            ids, labels, token_mask = ids[:max_length], labels[:max_length], token_mask[:max_length]
        sequences.append(ids)
        label_rows.append(labels)
        mask_rows.append(token_mask)
        if row_image is not None:
            images.append(row_image)

    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    length = max(len(s) for s in sequences)
    batch_size = len(sequences)
    input_ids = torch.full((batch_size, length), pad, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    labels_t = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    token_mask_t = torch.zeros(batch_size, length, dtype=torch.bool)
    # Right padding: positions stay 0..len-1 for models that derive them from the index.
    for i, (ids, labels, token_mask) in enumerate(zip(sequences, label_rows, mask_rows)):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels_t[i, :n] = torch.tensor(labels, dtype=torch.long)
        token_mask_t[i, :n] = torch.tensor(token_mask, dtype=torch.bool)

    vocab = vocab_size if vocab_size is not None else len(tokenizer)
    variants = tuple(name_variants) if name_variants is not None else (name, " " + name)
    name_ids = name_token_ids(tokenizer, variants)
    if not name_ids:
        raise ValueError(f"name {name!r} tokenises to no (non-special) token")
    if max(name_ids) >= vocab:
        raise ValueError(
            f"vocab_size={vocab} is smaller than a token id of the name ({max(name_ids)})"
        )
    vocab_mask = torch.ones(vocab, dtype=torch.bool)
    vocab_mask[torch.tensor(name_ids, dtype=torch.long)] = False

    batch: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels_t,
        "token_mask": token_mask_t,
        "vocab_mask": vocab_mask,
        "siu_aim": torch.tensor([r[3] for r in rows], dtype=torch.long),
    }
    if images:
        batch["pixel_values"] = torch.stack(images)
    return batch
