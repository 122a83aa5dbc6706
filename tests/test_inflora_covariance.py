"""InfLoRA's input covariance: of each adapted module's input, over non-padded positions only, through the decoder
body (no LM head), equal to an independent capture of the same inputs from a full forward."""

import torch
from test_baselines import batch, ctx, tiny_method

from harness.methods.inflora import InputCovariance, decoder_body


def started(tmp_path):
    """InfLoRA at the start of stage 1 on one padded batch (its own covariance pass designed A_1)."""
    method, tok = tiny_method("inflora", tmp_path)
    b = batch(tok)
    method.begin_stage(ctx(1, tmp_path, batches=lambda indices, size: iter([b]), n_examples=2))
    return method, b


def independent_covariances(model, layers, b) -> tuple[dict, dict]:
    """mean x xᵀ of each module's input from forward hooks on its base layer during a full forward: over the
    non-padded positions, and (to show the test can tell) over every position."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        layer.base_layer.register_forward_hook(lambda m, inp, out, n=n: seen.__setitem__(n, inp[0].detach()))
        for n, layer in layers
    ]
    with torch.no_grad():
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    mask = b["attention_mask"].bool()
    kept, every = {}, {}
    for n, x in seen.items():
        X, A = x[mask].double(), x.reshape(-1, x.shape[-1]).double()
        kept[n], every[n] = X.T @ X / X.shape[0], A.T @ A / A.shape[0]
    return kept, every


def test_the_covariance_is_of_module_inputs_over_non_padded_tokens(tmp_path):
    method, b = started(tmp_path)
    layers = list(method.adapters.layers())
    assert not b["attention_mask"].bool().all(), "the batch must have padding for the test to mean anything"
    got = InputCovariance(layers).collect(method.model, [b])
    kept, every = independent_covariances(method.model, layers, b)
    assert set(got) == set(kept) and len(got) >= 7
    for n in got:
        torch.testing.assert_close(got[n], kept[n], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(got[n], every[n], rtol=1e-3, atol=1e-6), f"{n}: padding made no difference"


def test_the_pass_skips_the_lm_head_unless_an_adapted_layer_lives_outside_the_body(tmp_path):
    method, b = started(tmp_path)
    layers = [m for _, m in method.adapters.layers()]
    body = decoder_body(method.model, layers)
    assert body is method.model.get_base_model().get_decoder()
    head = method.model.get_base_model().get_output_embeddings()
    calls = []
    handle = head.register_forward_hook(lambda *a: calls.append(1))
    InputCovariance(list(method.adapters.layers())).collect(method.model, [b])
    handle.remove()
    assert calls == [], "the covariance pass computed logits"
    assert decoder_body(method.model, [*layers, head]) is method.model
