"""SIU: the constructed-target builder (masks checked position by position) and one step of
the method against a hand-written float64 step (plain SGD, so the update is -lr * d)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import IMAGE_SIZE, IMAGE_TOKEN_ID, IMAGE_TOKENS, VOCAB, make_model
from unlearnopt.methods.siu_targets import (
    AIM_ALIGN,
    AIM_DESCRIBE,
    AIM_FACTS,
    AIM_PRESERVE,
    build_siu_targets,
    model_inputs,
)

WORDS = tuple(
    dict.fromkeys(
        [
            "<pad>",
            "<unk>",
            "<s>",
            "</s>",
            "who",
            "is",
            "this",
            "?",
            "donald",
            "trump",
            "jacob",
            "smith",
            ".",
            "a",
            "baker",
            "from",
            "ohio",
            "describe",
            "the",
            "person",
            "in",
            "image",
            "where",
            "does",
            "live",
            "he",
            "lives",
            "washington",
            "joe",
            "biden",
        ]
    )
)


def word_tokenizer():
    """A word-level tokenizer of VOCAB ids, built in memory (no download); ``<image>`` is
    the tiny LLaVA's image token id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(WORDS) + [f"w{i}" for i in range(VOCAB - 1 - len(WORDS))] + ["<image>"]
    assert len(set(words)) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def build(tok, **kw):
    args = dict(
        name="donald trump",
        fictitious_name="jacob smith",
        questions=["who is {concept} ?", "who is this ?"],
        answer_template="this is {fictitious_name} .",
        description="{fictitious_name} is a baker from ohio .",
        description_questions=["describe {concept} ."],
        facts=[("where does {concept} live ?", "he lives in washington .")],
        preserved=[("who is joe biden ?", "this is joe biden .")],
    )
    args.update(kw)
    return build_siu_targets(tok, **args)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_builder_rows_labels_and_masks(tok):
    batch = build(tok)
    assert batch["siu_aim"].tolist() == [
        AIM_ALIGN,
        AIM_ALIGN,
        AIM_DESCRIBE,
        AIM_FACTS,
        AIM_PRESERVE,
    ]
    eos = tok.eos_token_id
    rows = [
        ("who is donald trump ?", "this is jacob smith ."),
        ("who is this ?", "this is jacob smith ."),
        ("describe donald trump .", "jacob smith is a baker from ohio ."),
        ("where does donald trump live ?", "he lives in washington ."),
        ("who is joe biden ?", "this is joe biden ."),
    ]
    length = max(len(ids(tok, p)) + len(ids(tok, a)) + 1 for p, a in rows)
    assert batch["input_ids"].shape == (5, length)
    for i, (prompt, answer) in enumerate(rows):
        p, a = ids(tok, prompt), [*ids(tok, answer), eos]
        n = len(p) + len(a)
        assert batch["input_ids"][i, :n].tolist() == p + a
        assert batch["input_ids"][i, n:].eq(tok.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (length - n)
        assert batch["labels"][i].tolist() == [-100] * len(p) + a + [-100] * (length - n)
        # DMK keeps exactly the answer tokens of aims (3)-(4); aims (1)-(2) answers, prompts
        # and padding are masked out.
        keep = i >= 3
        expected = [False] * len(p) + [keep] * len(a) + [False] * (length - n)
        assert batch["token_mask"][i].tolist() == expected
    assert batch["token_mask"].dtype == torch.bool
    vocab_mask = batch["vocab_mask"]
    assert vocab_mask.shape == (len(tok),) and vocab_mask.dtype == torch.bool
    masked = (~vocab_mask).nonzero().flatten().tolist()
    assert masked == sorted(ids(tok, "donald trump"))
    assert "pixel_values" not in batch
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "labels"}


def test_builder_image_rows(tok):
    image = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE)
    other = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE)
    batch = build(
        tok,
        concept="the person in the image",
        image=image,
        image_token="<image>",
        image_seq_length=IMAGE_TOKENS,
        prompt_template="{image} {prompt}",
        preserved=[
            ("who is this ?", "this is joe biden .", other),
            ("who is joe biden ?", "this is joe biden ."),
        ],
    )
    # Rows of aims 1-3 carry the concept's image, the first aim-4 row its own, the last none.
    assert torch.equal(batch["pixel_values"], torch.stack([image] * 4 + [other]))
    n_image = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    assert n_image == [IMAGE_TOKENS] * 5 + [0]
    assert batch["input_ids"][0, :IMAGE_TOKENS].eq(IMAGE_TOKEN_ID).all()
    assert batch["labels"][batch["input_ids"] == IMAGE_TOKEN_ID].eq(-100).all()
    # The image token is special: never part of the masked name ids.
    assert batch["vocab_mask"][IMAGE_TOKEN_ID]


def test_builder_errors(tok):
    with pytest.raises(ValueError, match="image_token is required"):
        build(tok, image=torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match=r"image must be a \[C, H, W\] tensor"):
        build(tok, image=torch.randn(4, 4), image_token="<image>")
    with pytest.raises(ValueError, match="nothing to build"):
        build_siu_targets(tok, name="donald trump", fictitious_name="jacob smith", questions=[])
    with pytest.raises(ValueError, match="vocab_size=5 is smaller"):
        build(tok, vocab_size=5)
    with pytest.raises(ValueError, match=r"facts\[0\] must be"):
        build(tok, facts=["where ?"])
    with pytest.raises(TypeError, match="single str"):
        build(tok, questions="who is this ?")


def siu_batch(tok, kind: str) -> dict[str, torch.Tensor]:
    if kind == "llava":
        g = torch.Generator().manual_seed(1)
        return build(
            tok,
            concept="the person in the image",
            image=torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g).double(),
            image_token="<image>",
            image_seq_length=IMAGE_TOKENS,
            prompt_template="{image} {prompt}",
            vocab_size=VOCAB,
            preserved=[("who is joe biden ?", "this is joe biden .")],
        )
    return build(tok, vocab_size=VOCAB)


def hand_written_siu_update(model, ref, batch, lr, alpha, beta):
    """-lr * d with d = grad(alpha * CE + beta * DMK), plain PyTorch in float64."""
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1]
    with torch.no_grad():
        ref_logits = ref(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    m = batch["token_mask"][:, 1:]
    u = batch["vocab_mask"].double()
    lp, lq = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    kl = (u * lq.exp() * (lq - lp)).sum(-1)
    dmk = kl[m].sum() / m.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(alpha * ce + beta * dmk, params, allow_unused=True)
    update = [torch.zeros_like(p) if g is None else -lr * g for p, g in zip(params, grads)]
    return update, ce.item(), dmk.item()


def update_tolerance() -> float:
    """Relative tolerance of the update: the float64 HF Llama/LLaVA still compute RMSNorm and
    the attention softmax in float32, so the hand-written route (one backward of
    alpha*CE + beta*DMK) and the library's (one backward per objective, then combined) agree
    to ~1e-7 relative, not to float64 rounding (measured: 3.5e-8 and 5.5e-8)."""
    return 1e-6


def perturbed_pair(kind: str):
    """(model, frozen original): the model moved away from the original, so the KL is not 0."""
    model = make_model(kind, dtype=torch.float64)
    ref = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, ref


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_step_equals_hand_written_float64(tok, kind):
    from unlearnopt.unlearner import MultiObjectiveUnlearner

    model, ref = perturbed_pair(kind)
    batch = siu_batch(tok, kind)
    lr, alpha, beta = 0.5, 0.9, 0.75
    expected, ce, dmk = hand_written_siu_update(copy.deepcopy(model), ref, batch, lr, alpha, beta)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    unlearner = MultiObjectiveUnlearner(model, opt, method="siu", ref_model=ref)
    stats = unlearner.step(forget=batch)
    assert stats["loss/siu_ce"] == pytest.approx(ce, rel=1e-6)  # stats are float32
    assert stats["loss/siu_dmk"] == pytest.approx(dmk, rel=1e-6)
    assert dmk > 0
    assert stats["weight/siu_ce"] == pytest.approx(alpha, rel=1e-6)
    assert stats["weight/siu_dmk"] == pytest.approx(beta, rel=1e-6)
    # Error relative to the largest update element (some tensors, e.g. attention key biases,
    # have a mathematically zero gradient that is 1e-19 rounding noise).
    scale = max(e.abs().max().item() for e in expected)
    worst = (
        max(
            ((p.detach() - b) - e).abs().max().item()
            for p, b, e in zip(model.parameters(), before, expected)
        )
        / scale
    )
    assert worst < update_tolerance(), f"relative error of the update {worst:.3e}"
    # The batch the caller passed is untouched (masks are not stripped from it).
    assert "token_mask" in batch and "vocab_mask" in batch


def test_micro_batches_equal_one_batch(tok):
    """accumulate=2 splits rows and masks consistently: same update as one batch."""
    from unlearnopt.unlearner import MultiObjectiveUnlearner

    model, ref = perturbed_pair("llama")
    batch = siu_batch(tok, "llama")
    results = []
    for accumulate in (1, 2):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        MultiObjectiveUnlearner(m, opt, method="siu", ref_model=ref, accumulate=accumulate).step(
            forget=batch
        )
        results.append([(p - q).detach() for p, q in zip(m.parameters(), model.parameters())])
    # The unlearner weights micro-batches by float32 token shares (~1e-7 relative), so the
    # two updates agree to that, relative to the largest update element; a mask split
    # wrongly across micro-batches would change the DMK term by O(1).
    scale = max(a.abs().max().item() for a in results[0])
    worst = max((a - b).abs().max().item() for a, b in zip(*results)) / scale
    assert worst < 1e-5, f"micro-batched update differs by {worst:.3e} (relative)"


def test_options_validated():
    from unlearnopt.methods.siu import SIU

    assert SIU().config == {"alpha": 0.9, "beta": 0.75, "direction": "forward", "temperature": 1.0}
    with pytest.raises(ValueError, match="direction"):
        SIU(direction="sideways")
    with pytest.raises(TypeError, match="unknown option"):
        SIU(gamma=1.0)
