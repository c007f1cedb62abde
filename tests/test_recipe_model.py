"""The GPT recipe's decoder: sizes of the presets, causality, RoPE, GQA, init, FLOP count."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from recipes.gpt.config import builtin_configs, load_config
from recipes.gpt.model import ModelConfig, Transformer, apply_rope, cross_entropy, rope_tables

#: Parameter counts each preset is named for (the sizes README/DESIGN quote), with slack.
EXPECTED_PARAMS = {
    "tiny": (0.5e6, 2e6),
    "small": (5e6, 20e6),
    "medium": (100e6, 150e6),
    "large": (0.9e9, 1.3e9),
}


def tiny(**overrides: object) -> ModelConfig:
    base: dict[str, object] = {"dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 16}
    return ModelConfig.model_validate(base | overrides)


def test_every_preset_is_covered() -> None:
    assert set(builtin_configs()) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_preset_parameter_counts_on_meta_device(name: str) -> None:
    cfg = load_config(name, environ={}).model
    with torch.device("meta"):  # counts a 1B model without allocating it
        model = Transformer(cfg)
    low, high = EXPECTED_PARAMS[name]
    assert low <= model.num_params() <= high
    assert len(model.layers) == cfg.n_layers
    assert isinstance(model.layers, torch.nn.ModuleList)  # FSDP2 shards each block


def test_tiny_preset_exact_count() -> None:
    cfg = load_config("tiny", environ={}).model
    assert Transformer(cfg).num_params() == 869_504


def test_forward_shape_and_loss_at_init() -> None:
    cfg = tiny(vocab_size=50)
    model = Transformer(cfg, seed=0)
    tokens = torch.randint(0, 50, (3, 16))
    logits = model(tokens)
    assert logits.shape == (3, 16, 50)
    # Near-uniform predictions at init: the loss is close to ln(vocab).
    loss = cross_entropy(logits, tokens)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


def test_sequence_longer_than_rope_table_is_rejected() -> None:
    model = Transformer(tiny(), seed=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_future_tokens_do_not_change_past_logits(kv_heads: int | None) -> None:
    model = Transformer(tiny(n_kv_heads=kv_heads), seed=1).eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_rope_scores_depend_only_on_relative_position() -> None:
    cos, sin = rope_tables(head_dim=8, seq_len=32, theta=10000.0)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=gen), torch.randn(8, generator=gen)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q.view(1, 1, 1, 8), cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k.view(1, 1, 1, 8), cos[n : n + 1], sin[n : n + 1])
        return float((qm * kn).sum())

    assert score(3, 1) == pytest.approx(score(20, 18), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_rope_makes_attention_position_aware() -> None:
    """Without positions, a causal model could not tell "ab" from "ba" at the last token."""
    model = Transformer(tiny(), seed=0).eval()
    with torch.no_grad():
        ab = model(torch.tensor([[5, 9, 1]]))[0, -1]
        ba = model(torch.tensor([[9, 5, 1]]))[0, -1]
    assert not torch.allclose(ab, ba)


def test_grouped_query_attention_shrinks_kv_projections() -> None:
    full, grouped = Transformer(tiny(), seed=0), Transformer(tiny(n_kv_heads=1), seed=0)
    assert grouped.layers[0].attention.wk.weight.shape == (8, 32)
    assert grouped.num_params() < full.num_params()


def test_tied_embeddings_share_one_matrix() -> None:
    untied, tied = Transformer(tiny(), seed=0), Transformer(tiny(tie_embeddings=True), seed=0)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 256 * 32


def test_init_is_a_function_of_the_seed() -> None:
    a, b, c = (Transformer(tiny(), seed=s).state_dict() for s in (7, 7, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attention.wq.weight"], c["layers.0.attention.wq.weight"])
    assert torch.equal(a["norm.weight"], torch.ones(32))


def test_global_rng_is_left_alone_by_init() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Transformer(tiny(), seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_rope_tables_are_not_in_the_state_dict() -> None:
    assert not any("rope" in key for key in Transformer(tiny(), seed=0).state_dict())


def test_flops_per_token_formula() -> None:
    cfg = tiny()
    model = Transformer(cfg, seed=0)
    embedding = cfg.vocab_size * cfg.dim
    attention = 12 * cfg.n_layers * cfg.dim * 16
    assert model.flops_per_token(16) == 6 * (model.num_params() - embedding) + attention
    tied = Transformer(tiny(tie_embeddings=True), seed=0)
    assert tied.flops_per_token(16) == 6 * tied.num_params() + attention


def test_swiglu_width_follows_llama_rounding() -> None:
    assert ModelConfig(dim=4096, multiple_of=256).ffn_hidden == 11008  # Llama 2 7B
    llama3_1b = ModelConfig(dim=2048, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.5)
    assert llama3_1b.ffn_hidden == 8192


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dim": 30, "n_heads": 4}, "not divisible by n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"dim": 12, "n_heads": 4}, "even"),
    ],
)
def test_inconsistent_shapes_are_rejected(fields: dict[str, int], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig.model_validate(fields)


def test_a_few_steps_fit_a_fixed_batch() -> None:
    model = Transformer(tiny(), seed=0)
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
