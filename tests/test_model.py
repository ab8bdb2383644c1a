"""AdaptedModel: the PEFT-shaped API, invariants over whole models, mixed batches."""

from __future__ import annotations

import pytest
import torch

import tilpass
from tests.helpers import lora, tiny_gpt2, tiny_llama, tokens
from tilpass.methods.lora import LoraLayer
from tilpass.routing import current_routing


def logits(model: torch.nn.Module, x: torch.Tensor, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def test_get_peft_model_trains_only_adapters_and_base_is_unchanged_after_a_step() -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora(modules_to_save=["lm_head"]))
    base_before = {
        k: v.clone()
        for k, v in model.base_model.state_dict().items()
        if "lora_" not in k and "modules_to_save" not in k
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        n
        for n, _ in model.named_parameters()
        if ".lora_A." in n or ".lora_B." in n or ".modules_to_save.default." in n
    }
    assert trainable == expected and len(trainable) == 4 * 2 + 1
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    optim.step()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in trainable), name
    after = model.base_model.state_dict()
    for key, value in base_before.items():
        assert torch.equal(after[key], value), key


def test_state_dict_keeps_base_keys() -> None:
    base_keys = set(tiny_llama().state_dict())
    model = tilpass.get_peft_model(tiny_llama(), lora())
    keys = set(model.base_model.state_dict())
    assert base_keys <= keys
    assert {k for k in keys - base_keys if ".lora_A." not in k and ".lora_B." not in k} == set()


def test_disable_adapter_is_base_bit_for_bit_even_when_merged() -> None:
    x = tokens()
    expected = logits(tiny_llama(), x)
    model = tilpass.get_peft_model(tiny_llama(), lora(target_modules="all-linear"))
    assert not torch.equal(logits(model, x), expected)
    with model.disable_adapter():
        assert torch.equal(logits(model, x), expected)
    model.merge_adapter()
    merged = logits(model, x)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, x), merged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_and_merge_and_unload(factory: object) -> None:
    x = tokens()
    target = ["q_proj", "v_proj", "embed_tokens"] if factory is tiny_llama else ["c_attn", "c_fc"]
    model = tilpass.get_peft_model(factory(), lora(target_modules=target))  # type: ignore[operator]
    originals = {
        n: p.detach().clone() for n, p in model.base_model.named_parameters() if not p.requires_grad
    }
    unmerged = logits(model, x)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for name, p in model.base_model.named_parameters():
        if name in originals:
            torch.testing.assert_close(p, originals[name], atol=1e-6, rtol=0)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(factory().state_dict())  # type: ignore[operator]
    torch.testing.assert_close(logits(plain, x), unmerged, atol=1e-5, rtol=1e-5)


def test_merging_a_tied_embedding_keeps_the_head_and_reties_on_unmerge(tmp_path: object) -> None:
    """GPT-2's wte is lm_head's weight: merging must not change the head's weight."""
    x = tokens()
    model = tilpass.get_peft_model(tiny_gpt2(), lora(target_modules=["wte", "c_attn"]))
    head = model.base_model.lm_head.weight
    wte = model.base_model.transformer.wte
    assert wte.weight is head
    base_head = head.detach().clone()
    unmerged = logits(model, x)

    model.merge_adapter()
    assert wte.weight is not head and torch.equal(head, base_head)
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert wte.weight is head and torch.equal(head, base_head)  # tie restored, exactly

    with pytest.warns(
        UserWarning, match=r"transformer\.wte\.weight \(shared with lm_head\.weight\)"
    ):
        plain = model.merge_and_unload()
    assert plain.transformer.wte.weight is not plain.lm_head.weight
    assert torch.equal(plain.lm_head.weight, base_head)
    torch.testing.assert_close(logits(plain, x), unmerged, atol=1e-5, rtol=1e-5)

    plain.save_pretrained(tmp_path)  # the untie survives a save and a reload
    reloaded = type(plain).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, x), logits(plain, x))


def test_unload_gives_the_base_model_back() -> None:
    x = tokens()
    expected = logits(tiny_llama(), x)
    model = tilpass.get_peft_model(tiny_llama(), lora())
    plain = model.unload()
    assert torch.equal(logits(plain, x), expected)


def test_several_active_adapters_add_up() -> None:
    x = tokens()
    base = logits(tiny_llama(), x)
    model = tilpass.get_peft_model(tiny_llama(), lora())
    model.add_adapter("other", lora(target_modules=["k_proj"]))
    only_a = logits(model, x)
    model.set_adapter("other")
    only_b = logits(model, x)
    model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    both = logits(model, x)
    assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
    model.merge_adapter()  # merging while several adapters are active merges them all
    torch.testing.assert_close(logits(model, x), both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, x), base, atol=1e-5, rtol=1e-5)


def test_delete_adapter_removes_every_trace() -> None:
    base_keys = set(tiny_llama().state_dict())
    model = tilpass.get_peft_model(tiny_llama(), lora(modules_to_save=["lm_head"]))
    model.add_adapter("legal", lora(target_modules="all-linear", use_dora=True))
    model.delete_adapter("legal")
    assert "legal" not in model.peft_config and "legal" not in model.adapter_ids
    assert not [k for k in model.state_dict() if "legal" in k]
    assert not [n for n, _ in model.named_modules() if "legal" in n]
    for _, module in model.named_modules():
        if isinstance(module, LoraLayer):
            assert "legal" not in module.specs and "legal" not in module.active
    model.delete_adapter("default")
    assert set(model.base_model.state_dict()) == base_keys
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_active_adapter_and_unknown_names() -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora())
    assert model.active_adapter == "default"
    with pytest.raises(tilpass.AdapterNameError, match="no adapter named 'nope'"):
        model.set_adapter("nope")
    with pytest.raises(tilpass.AdapterNameError, match="already exists"):
        model.add_adapter("default", lora())
    with pytest.raises(tilpass.AdapterNameError, match="__base__"):
        model.add_adapter("__base__", lora())


def _mixed_model() -> tilpass.AdaptedModel:
    model = tilpass.get_peft_model(tiny_llama(), lora(target_modules="all-linear"), "medical")
    model.add_adapter("legal", lora(r=8, target_modules=["q_proj"]))  # other rank, other modules
    model.add_adapter("emb", lora(target_modules=["embed_tokens", "v_proj"], use_rslora=True))
    return model


@pytest.mark.parametrize(
    "names",
    [
        ["medical", "legal", "__base__", "medical"],  # unequal groups (padding path)
        ["medical", "legal", "emb", "__base__"],  # equal groups (reshape path)
        ["legal", "legal", "legal", "legal"],  # one adapter for all rows
        ["__base__"] * 4,
    ],
)
def test_mixed_batch_rows_equal_each_adapter_alone(names: list[str]) -> None:
    model = _mixed_model()
    x = tokens(batch=4, length=5)
    alone = {}
    for name in set(names) - {"__base__"}:
        model.set_adapter(name)
        alone[name] = logits(model, x)
    with model.disable_adapter():
        alone["__base__"] = logits(model, x)
    mixed = logits(model, x, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=1e-5)


def test_mixed_batch_generate_matches_each_adapter_alone() -> None:
    model = _mixed_model()
    x = tokens(batch=4, length=5)
    names = ["medical", "legal", "__base__", "emb"]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    mixed = model.generate(input_ids=x, adapter_names=names, **kw)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=x[row : row + 1], **kw)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=x[row : row + 1], **kw)
        length = alone.shape[1]  # a row that ended early is padded in the batch
        assert torch.equal(mixed[row, :length], alone[0]), name
        assert bool((mixed[row, length:] == 0).all()), name


def test_mixed_batch_gradients_match_per_adapter_runs() -> None:
    model = _mixed_model()
    model.train()
    model.set_requires_grad(["medical", "legal", "emb"])  # inactive ones are frozen by default
    x = tokens(batch=2, length=5)
    ids = torch.tensor([model.adapter_id("medical"), model.adapter_id("legal")])
    model(input_ids=x, labels=x, adapter_ids=ids).loss.backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone: dict[str, torch.Tensor] = {}
    for row, name in enumerate(["medical", "legal"]):  # each row alone, with its adapter
        model.set_adapter(name)
        loss = model(input_ids=x[row : row + 1], labels=x[row : row + 1]).loss
        (loss / 2).backward()  # the batch loss is the mean of the two rows' (equal) losses
        alone |= {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
    trained = {n for n in alone if n.endswith((".medical", ".legal"))}
    assert trained and any("lora_A.medical" in n for n in trained)
    assert any("lora_A.legal" in n for n in trained)
    for name in trained:
        torch.testing.assert_close(mixed[name], alone[name], atol=1e-6, rtol=1e-5)
    unused = [g for n, g in mixed.items() if n.endswith(".emb")]
    assert unused and all(torch.count_nonzero(g) == 0 for g in unused)


def test_adapter_ids_route_like_names_and_stay_stable_after_a_delete() -> None:
    model = _mixed_model()
    x = tokens(batch=3, length=5)
    names = ["medical", "emb", "__base__"]
    by_name = logits(model, x, adapter_names=names)
    ids = torch.tensor([model.adapter_id(n) if n != "__base__" else -1 for n in names])
    torch.testing.assert_close(logits(model, x, adapter_ids=ids), by_name, atol=0, rtol=0)
    model.delete_adapter("legal")  # an adapter loaded before "emb"
    assert model.adapter_id("emb") == ids[1]  # ids do not shift
    torch.testing.assert_close(logits(model, x, adapter_ids=ids), by_name, atol=1e-6, rtol=1e-6)
    per_token = ids.unsqueeze(1).expand(3, 5)  # (B, T): the same routing, per token
    torch.testing.assert_close(logits(model, x, adapter_ids=per_token), by_name, atol=1e-6, rtol=0)
    with pytest.raises(tilpass.AdapterNameError, match="no loaded adapter's id"):
        model(input_ids=x, adapter_ids=torch.tensor([ids[0], 99, -1]))
    with pytest.raises(ValueError, match="adapter_names or adapter_ids, not both"):
        model(input_ids=x, adapter_names=names, adapter_ids=ids)


def test_mixed_batch_with_modules_to_save() -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora(modules_to_save=["lm_head"]), "a")
    model.add_adapter("b", lora(modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.lm_head.modules_to_save["b"].weight.normal_()
    x = tokens(batch=3)
    names = ["a", "b", "__base__"]
    mixed = logits(model, x, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected = logits(model, x)
        else:
            model.set_adapter(name)
            expected = logits(model, x)
        torch.testing.assert_close(mixed[row], expected[row], atol=1e-5, rtol=1e-5)


def test_mixed_batch_errors() -> None:
    model = _mixed_model()
    x = tokens(batch=2)
    with pytest.raises(tilpass.AdapterNameError, match=r"non-existing adapter\(s\): nope.*medical"):
        model(input_ids=x, adapter_names=["medical", "nope"])
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows"):
        model(input_ids=x, adapter_names=["medical", "legal", "emb"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        model(input_ids=x, adapter_names="medical")  # type: ignore[arg-type]
    model.set_adapter("medical")
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model(input_ids=x, adapter_names=["medical", "legal"])
    model.unmerge_adapter()
    model.add_adapter("dora", lora(use_dora=True, target_modules=["embed_tokens"]))
    with pytest.raises(NotImplementedError, match="DoRA"):  # DoRA mixes on Linear layers only
        model(input_ids=x, adapter_names=["dora", "legal"])
    assert current_routing() is None  # an error leaves no routing behind


def test_low_rank_warns() -> None:
    with pytest.warns(UserWarning, match="r=8 is a good start"):
        tilpass.LoraConfig(r=2, target_modules=["q_proj"])


def test_large_adapter_warns_naming_the_modules(tmp_path: object) -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora(modules_to_save=["lm_head"]))
    with pytest.warns(UserWarning, match=r"lm_head \("):
        model.save_pretrained(tmp_path)  # type: ignore[arg-type]


def test_print_trainable_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)  # v_proj out is 16 (GQA)
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}\n"
    )


def test_mixed_dora_rows_see_magnitudes_changed_in_place() -> None:
    """The cached DoRA magnitude table of a mixed batch follows in-place weight changes."""
    model = tilpass.get_peft_model(tiny_llama(), lora(use_dora=True), "dora")
    model.add_adapter("plain", lora(r=8))
    x, names = tokens(batch=2), ["dora", "plain"]
    logits(model, x, adapter_names=names)  # builds the tables
    q_proj = model.base_model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.lora_magnitude_vector["dora"].mul_(1.5)
    mixed = logits(model, x, adapter_names=names)
    model.set_adapter("dora")
    torch.testing.assert_close(mixed[0], logits(model, x)[0], atol=1e-5, rtol=1e-5)


def test_mixed_batch_sees_adapter_weights_changed_in_place() -> None:
    """The stacked-adapter cache must not serve stale weights after an optimizer step."""
    model = _mixed_model()
    x = tokens(batch=2)
    logits(model, x, adapter_names=["medical", "legal"])  # builds the cache
    with torch.no_grad():
        model.base_model.model.layers[0].self_attn.q_proj.lora_B["medical"].add_(0.5)
    mixed = logits(model, x, adapter_names=["medical", "legal"])
    model.set_adapter("medical")
    torch.testing.assert_close(mixed[0], logits(model, x)[0], atol=1e-5, rtol=1e-5)


def test_dora_inference_follows_weights_changed_in_place() -> None:
    """Inference (no grad) reads DoRA's cached magnitudes; they must follow in-place changes
    and equal the directly computed forward (grad enabled) on the whole logits."""
    model = tilpass.get_peft_model(tiny_llama(), lora(use_dora=True), "dora")
    model.eval()
    x = tokens(batch=2)
    logits(model, x)  # builds the tables
    q_proj = model.base_model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.lora_B["dora"].add_(0.3)
        q_proj.lora_magnitude_vector["dora"].mul_(1.5)
    cached = logits(model, x)
    direct = model(input_ids=x).logits.detach()  # grad enabled: the norms computed afresh
    torch.testing.assert_close(cached, direct, atol=1e-6, rtol=1e-6)
