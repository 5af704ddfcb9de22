"""RoCoFT on a quantized frozen base (rocoft_pl.quantized): bitsandbytes NF4 / FP4 (double quantisation, fp32 and
bf16 compute) and LLM.int8, torchao int8 / int4 weight-only, all on the CPU.

Numerics against a dense reference holding the dequantised W0; only the selected rows move; Wanda on a
quantized base; adapters across quantized and full-precision bases; merging (exact or refused, and into a plain
model); Lightning's BitsandbytesPrecision with the RoCoFT callback; the CLI switch; clear errors for layers and
settings that are not supported.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

bnb = pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is not installed: pip install -e '.[quant]' (the Makefile's install does)"
)

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import tiny_causal_lm as tl  # noqa: E402
from rocoft_pl import (  # noqa: E402
    RoCoFT,
    RoCoFTConfig,
    RoCoFTLinear,
    apply_rocoft,
    load_adapter,
    merge_rocoft,
    merge_rocoft_dequantized,
    rocoft_layers,
    save_adapter,
    unmerge_rocoft,
)
from rocoft_pl.quantized import (  # noqa: E402
    dequantized_weight,
    hf_quantization_config,
    is_quantized,
    quantization_kind,
    quantize_linear,
)

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
torchao_only = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed: pip install -e '.[quant]'")
TINY = dict(hidden_size=64, intermediate_size=128)  # bitsandbytes' CPU kernels want multiples of 32
KINDS = [
    pytest.param("nf4", torch.float32, id="nf4-fp32"),
    pytest.param("nf4-dq", torch.bfloat16, id="nf4-dq-bf16"),
    pytest.param("fp4", torch.bfloat16, id="fp4-bf16"),
    pytest.param("fp4-dq", torch.float32, id="fp4-dq-fp32"),
    pytest.param("int8", None, id="int8"),
    pytest.param("torchao-int8", None, id="torchao-int8", marks=torchao_only),
    pytest.param("torchao-int4", None, id="torchao-int4", marks=torchao_only),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama checkpoint on disk (with biases, to train them too) and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tl.tiny_llama(**TINY, attention_bias=True, mlp_bias=True).save_pretrained(path)
    tl.tiny_tokenizer().save_pretrained(path)
    return path


def load(path, kind=None, compute_dtype=torch.float32):
    """The checkpoint in full precision, or loaded quantized through transformers' BitsAndBytesConfig."""
    from transformers import AutoModelForCausalLM

    if kind is None:
        return AutoModelForCausalLM.from_pretrained(path)
    config = hf_quantization_config(kind, compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def ids(n=2, seq=10, seed=0):
    return torch.randint(2, 400, (n, seq), generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        batch = ids(seed=step)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def packed_state(model):
    """Every quantized layer's stored tensors (packed weight, absmax ...), cloned: what must never change."""
    out = {}
    for name, module in model.named_modules():
        name = name.removesuffix(".base")  # the same key once RoCoFT wrapped the layer
        if is_quantized(module):
            out[f"{name}.weight"] = module.weight.data.clone()
            state = getattr(module.weight, "quant_state", None)
            if state is not None:
                out[f"{name}.absmax"] = state.absmax.clone()
    return out


# -- the layer: numerics against a dense reference with the dequantised W0 ------------------------------------


def dense_copy(quantized: nn.Module) -> nn.Linear:
    """An nn.Linear holding the quantized layer's dequantised W0 (float32) and its bias."""
    w = dequantized_weight(quantized).float()
    dense = nn.Linear(w.shape[1], w.shape[0], bias=quantized.bias is not None)
    with torch.no_grad():
        dense.weight.copy_(w)
        if quantized.bias is not None:
            dense.bias.copy_(quantized.bias.float())
    return dense.requires_grad_(False)


def tolerance(kind, compute):
    if kind == "int8":  # LLM.int8 quantizes the activations too (per row, to int8)
        return 6e-2
    return 2e-2 if compute == torch.bfloat16 else 1e-4


@pytest.mark.parametrize("kind, compute", KINDS)
@pytest.mark.parametrize("mode", ["row", "column"])
def test_forward_and_delta_gradient_match_a_dequantised_dense_reference(kind, compute, mode):
    """Two stacked RoCoFT layers on quantized bases against the same on dense copies of the dequantised W0: the
    output and both deltas' gradients agree (the first delta's gradient passes through the second quantized
    kernel's backward). And the output is exactly base(x) + the delta term: W0 runs its own kernel."""
    torch.manual_seed(0)
    plain = [nn.Linear(64, 96), nn.Linear(96, 64)]
    quantized = [quantize_linear(lin, kind, compute_dtype=compute) for lin in plain]
    assert all(quantization_kind(q) is not None for q in quantized)
    dense = [dense_copy(q) for q in quantized]
    indices = [torch.tensor([3, 17, 40]), torch.tensor([0, 9, 31])]
    q_layers = [RoCoFTLinear(q, mode, i) for q, i in zip(quantized, indices)]
    d_layers = [RoCoFTLinear(d, mode, i) for d, i in zip(dense, indices)]
    for q, d in zip(q_layers, d_layers):
        assert q.delta.dtype == torch.float32  # the master delta, whatever W0's storage
        with torch.no_grad():
            q.delta.copy_(torch.randn_like(q.delta) * 0.1)
            d.delta.copy_(q.delta)
    x = torch.randn(3, 5, 64)
    weights = torch.randn(3, 5, 64)

    def run(layers):
        y = layers[1](torch.tanh(layers[0](x)))
        (y * weights).sum().backward()
        return y.detach()

    yq, yd = run(q_layers), run(d_layers)
    tol = tolerance(kind, compute)
    torch.testing.assert_close(yq, yd, rtol=tol, atol=tol * yd.abs().max().item())
    for q, d in zip(q_layers, d_layers):
        g = d.delta.grad
        torch.testing.assert_close(q.delta.grad, g, rtol=tol, atol=tol * g.abs().max().item())
    # forward = the quantized kernel + the delta term
    with torch.no_grad():
        layer = q_layers[0]
        base = layer.base(x)
        if mode == "row":
            term = torch.zeros_like(base).index_add_(-1, layer.indices, x @ layer.delta.t())
        else:
            term = x.index_select(-1, layer.indices) @ layer.delta.t()
        torch.testing.assert_close(layer(x) - base, term, rtol=0, atol=1e-6)


def test_trained_bias_on_a_quantized_base_stays_a_float32_master():
    """train_bias next to a 4-bit W0 with bf16 compute: the bias trains in float32 (bitsandbytes would round the
    bias it is handed to the compute dtype in place); its gradient is the dense reference's."""
    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(64, 96), "nf4", compute_dtype=torch.bfloat16)
    layer, ref = RoCoFTLinear(q, "row", torch.tensor([1, 2])), RoCoFTLinear(dense_copy(q), "row", torch.tensor([1, 2]))
    layer.train_bias(), ref.train_bias()
    x = torch.randn(4, 64)
    layer(x).sum().backward()
    ref(x).sum().backward()
    assert q.bias.dtype == torch.float32 and q.bias.requires_grad
    torch.testing.assert_close(q.bias.grad, ref.base.bias.grad)


# -- a model: only the selected rows change; W0 never -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_training_moves_only_the_selected_rows_and_never_w0(tiny_dir, kind):
    model = load(tiny_dir, kind)
    before = packed_state(model)
    dense_before = {n: dequantized_weight(m).float() for n, m in model.named_modules() if is_quantized(m)}
    report = apply_rocoft(model, RoCoFTConfig(mode="row", rank=2, selection="random", seed=1))
    assert report.base_params == sum(p.numel() for p in tl.tiny_llama(**TINY, attention_bias=True, mlp_bias=True).parameters())
    train_steps(model)
    after = packed_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # W0 bit for bit
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.endswith(".delta"))
    for name, layer in rocoft_layers(model).items():
        effective = dequantized_weight(layer.base).float() + layer.delta_weight()
        changed = (effective != dense_before[name]).any(dim=1).nonzero().flatten()
        assert changed.tolist() == layer.indices.tolist(), name  # exactly the selected rows, all of them


def test_eval_then_train_on_the_cpu_keeps_the_trainable_4bit_layout(tiny_dir):
    """bitsandbytes repacks a 4-bit layer for CPU inference on its first eval forward without grad, a layout
    without backward; RoCoFT keeps the trainable one, for the layers it does not adapt too."""
    model = load(tiny_dir, "nf4")
    apply_rocoft(model, RoCoFTConfig(mode="column", rank=1, targets=["q_proj", "v_proj"]))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids())
    model.train()
    train_steps(model, steps=1)
    states = [m.weight.quant_state for m in model.modules() if is_quantized(m)]
    assert states and not any(getattr(s, "packing_format_for_cpu", False) for s in states)


def test_wanda_scores_read_one_dequantised_layer_at_a_time(tiny_dir, monkeypatch):
    """Wanda on a 4-bit base (fp32 compute) picks the rows it picks on the dequantised dense model; each
    quantized target is dequantised once, on its own, and stays quantized."""
    import rocoft_pl.quantized as quantized

    calibration = [{"input_ids": ids(seed=s)} for s in range(2)]
    config = RoCoFTConfig(mode="row", rank=3, selection="max")
    model = load(tiny_dir, "nf4")
    dense = merge_rocoft_dequantized(load(tiny_dir, "nf4"), dtype=torch.float32)  # the same W0, as plain layers
    calls = []
    real = quantized.dequantized_weight
    monkeypatch.setattr(quantized, "dequantized_weight", lambda m: calls.append(m) or real(m))
    apply_rocoft(model, config, calibration)
    layers = rocoft_layers(model)
    assert len(calls) == len(layers) == 14 and len({id(m) for m in calls}) == 14
    assert all(is_quantized(layer.base) for layer in layers.values())
    apply_rocoft(dense, config, calibration)
    for name, layer in rocoft_layers(dense).items():
        assert layer.indices.tolist() == layers[name].indices.tolist(), name


# -- adapters: the same tensors on either base ------------------------------------------------------------------


def test_adapter_from_a_quantized_base_loads_onto_a_full_precision_one_and_back(tiny_dir, tmp_path):
    model = load(tiny_dir, "nf4-dq", compute_dtype=torch.bfloat16)
    apply_rocoft(model, RoCoFTConfig(mode="row", rank=2, train_bias=True))
    train_steps(model)
    save_adapter(model, tmp_path / "from_nf4")
    meta = json.loads((tmp_path / "from_nf4" / "adapter_config.json").read_text())
    note = meta["base_model"]["quantization"]
    assert note["quantized_targets"] == note["targets"] == 14
    (kind,) = note["kinds"]
    assert (kind["kind"], kind["double_quant"], kind["compute_dtype"], kind["layers"]) == ("bnb-nf4", True, "bfloat16", 14)

    full = load(tiny_dir)
    load_adapter(full, tmp_path / "from_nf4")  # the fingerprint counts the logical shapes: it matches
    save_adapter(full, tmp_path / "on_full")
    assert json.loads((tmp_path / "on_full" / "adapter_config.json").read_text())["base_model"]["quantization"] is None
    again = load(tiny_dir, "fp4")
    load_adapter(again, tmp_path / "on_full")
    save_adapter(again, tmp_path / "on_fp4")
    from safetensors.torch import load_file

    tensors = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("from_nf4", "on_full", "on_fp4")]
    assert tensors[0].keys() == tensors[1].keys() == tensors[2].keys()
    assert all(torch.equal(tensors[0][k], t[k]) for t in tensors[1:] for k in tensors[0])
    # the quantized model with the adapter computes what the dense one does, up to the 4-bit error of W0
    with torch.no_grad():
        a, b = again(input_ids=ids()).logits, full(input_ids=ids()).logits
    assert (a - b).abs().max() < 0.5 * b.abs().max()


# -- merging ------------------------------------------------------------------------------------------------------


def test_merge_into_4bit_is_refused_when_not_exact_and_changes_nothing(tiny_dir):
    model = load(tiny_dir, "nf4")
    apply_rocoft(model, RoCoFTConfig(mode="row", rank=2))
    train_steps(model)
    before, layers = packed_state(model), rocoft_layers(model)
    with torch.no_grad():
        logits = model(input_ids=ids()).logits
    with pytest.raises(ValueError, match="not exactly representable .*Nothing was merged.*merge_rocoft_dequantized"):
        merge_rocoft(model)
    assert rocoft_layers(model) == layers and not any(layer.merged for layer in layers.values())
    after = packed_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, logits)


def test_exact_merges_into_4bit_and_unmerge(tiny_dir):
    """Zero deltas merge (nothing to add); FP4 without double quantisation holds -W0 exactly (a sign flip on the
    same block scale), so rows set to -W0 merge into the 4-bit weights, and unmerge restores them bit for bit."""
    model = load(tiny_dir, "fp4")
    apply_rocoft(model, RoCoFTConfig(mode="row", rank=2))
    before = packed_state(model)
    with torch.no_grad():
        zero = model(input_ids=ids()).logits
        merge_rocoft(model)
        assert all(layer.merged for layer in rocoft_layers(model).values())
        assert torch.equal(model(input_ids=ids()).logits, zero)
        unmerge_rocoft(model)
        for layer in rocoft_layers(model).values():
            w0 = dequantized_weight(layer.base).float()
            layer.delta.copy_(-2 * w0.index_select(0, layer.indices))
        flipped = model(input_ids=ids()).logits
        merge_rocoft(model)
        assert all(is_quantized(m) for n, m in model.named_modules() if n.endswith("q_proj.base"))
        torch.testing.assert_close(model(input_ids=ids()).logits, flipped, rtol=1e-4, atol=1e-4)
        unmerge_rocoft(model)
    after = packed_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_rocoft_dequantized_gives_a_plain_model_that_saves_and_reloads(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load(tiny_dir, "nf4")
    apply_rocoft(model, RoCoFTConfig(mode="column", rank=2, train_bias=True))
    train_steps(model)
    with torch.no_grad():
        adapted = model(input_ids=ids()).logits
    merge_rocoft_dequantized(model)
    assert not rocoft_layers(model) and not any(is_quantized(m) for m in model.modules())
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for n, m in model.named_modules() if n.endswith("proj"))
    with torch.no_grad():
        merged = model(input_ids=ids()).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(is_quantized(m) for m in reloaded.modules())
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids()).logits, merged)


@torchao_only
def test_torchao_base_trains_saves_and_merges(tiny_dir, tmp_path):
    from rocoft_pl.quantized import quantize_in_memory

    model = quantize_in_memory(load(tiny_dir), "torchao-int8")
    assert {quantization_kind(m) for m in model.modules()} == {None, "torchao-Int8Tensor"}
    apply_rocoft(model, RoCoFTConfig(mode="row", rank=2))
    train_steps(model)
    save_adapter(model, tmp_path / "ad")
    note = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model"]["quantization"]
    assert note["kinds"][0]["kind"] == "torchao-Int8Tensor"
    with torch.no_grad():
        adapted = model(input_ids=ids()).logits
        merge_rocoft_dequantized(model)
        torch.testing.assert_close(model(input_ids=ids()).logits, adapted, rtol=1e-4, atol=1e-4)
    assert not any(is_quantized(m) for m in model.modules())


# -- what is not supported: a clear error, the model unchanged ----------------------------------------------------


class QuantLinear(nn.Module):
    """Stands for a GPTQ / AWQ style layer: packed int32 weights, no nn.Linear."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def test_unsupported_quantized_layers_are_refused_by_name_and_nothing_changes():
    model = tl.tiny_llama(**TINY)
    attn = model.model.layers[1].self_attn
    attn.q_proj = QuantLinear(64, 64)
    int_weights = nn.Linear(64, 64)
    int_weights.weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.int8), requires_grad=False)
    attn.v_proj = int_weights
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match=r"2 targets: 'model.layers.1.self_attn.q_proj' \(a QuantLinear .*'model.layers.1.self_attn.v_proj' \(an nn.Linear with a torch.int8 weight.*does not support.*bitsandbytes Linear4bit"):
        apply_rocoft(model, RoCoFTConfig(mode="row", rank=2))
    with pytest.raises(TypeError, match="torch.int8 weight"):
        apply_rocoft(model, RoCoFTConfig(mode="row", rank=2, targets=["v_proj"]))
    assert not rocoft_layers(model) and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # the layers around them are fine
    apply_rocoft(model, RoCoFTConfig(mode="row", rank=2, targets=["k_proj", "o_proj"]))
    with pytest.raises(TypeError, match="bitsandbytes OutlierAwareLinear"):
        RoCoFTLinear(bnb.nn.OutlierAwareLinear(64, 64), "row", torch.tensor([0]))
    with pytest.raises(ValueError, match="entries"):
        RoCoFTLinear(quantize_linear(nn.Linear(64, 64), "nf4"), "entries", torch.tensor([0, 5]))


def test_a_precision_that_casts_the_packed_4bit_weights_stops_the_fit(tiny_dir, tmp_path):
    """Packed 4-bit weights stored as bfloat16 (for FSDP2): bf16-true leaves them alone; 16-true casts them to fp16,
    which scrambles the packed bits, and the callback stops before the first step."""
    from rocoft_pl.modules.causal_lm import CausalLMModule

    def fit(precision):
        module = CausalLMModule(str(tiny_dir), warmup_steps=0, quantization="nf4", tokenizer=tl.tiny_tokenizer(),
                                quantization_options={"quant_storage": "bfloat16", "compute_dtype": "bfloat16"})
        trainer = pl.Trainer(accelerator="cpu", max_steps=1, precision=precision, callbacks=[RoCoFT(mode="row", rank=1)],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
        rows = [{"input_ids": row, "labels": row} for row in ids(n=4)]
        trainer.fit(module, DataLoader(rows, batch_size=2))
        return module

    module = fit("bf16-true")
    assert all(layer.base.weight.dtype == torch.bfloat16 for layer in rocoft_layers(module).values())
    with pytest.raises(ValueError, match="stored as torch.bfloat16, were cast to torch.float16"):
        fit("16-true")


def test_reselection_is_refused_on_a_quantized_base():
    from rocoft_pl.reselect import fold

    layer = RoCoFTLinear(quantize_linear(nn.Linear(64, 64), "nf4"), "row", torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="quantized W0"):
        fold(layer, torch.tensor([2, 3]))


# -- Lightning: BitsandbytesPrecision with the RoCoFT callback -----------------------------------------------------


class TinyLM(pl.LightningModule):
    """A plain LightningModule around a tiny Llama, trained on random tokens, validated on its loss."""

    def __init__(self, **overrides):
        super().__init__()
        self.model = tl.tiny_llama(**TINY, **overrides)

    def training_step(self, batch, _):
        return self.model(input_ids=batch, labels=batch).loss

    def validation_step(self, batch, _):
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def bnb_trainer(plugin, callback, tmp_path, **kwargs):
    """A CPU Trainer with Lightning's BitsandbytesPrecision. Lightning refuses the plugin unless the accelerator is
    CUDA ("Bitsandbytes is only supported on CUDA GPUs"), although bitsandbytes runs on the CPU: the plugin is
    put in after the Trainer's checks. The strategy's setup then runs as on a GPU: the plugin converts the Linears
    (RoCoFT's bases included, after the callback adapted the model) and the move to the device quantizes them."""
    trainer = pl.Trainer(accelerator="cpu", callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)
    trainer.strategy.precision_plugin = plugin
    return trainer


def token_loader(n=8, seq=12):
    g = torch.Generator().manual_seed(0)
    return DataLoader([torch.randint(2, 400, (seq,), generator=g) for _ in range(n)], batch_size=4)


def test_bitsandbytes_precision_plugin_and_the_callback_fit(tmp_path):
    """The callback adapts the plain model in setup; the plugin then makes each RoCoFT base a 4-bit layer; fit
    (with validation before and between steps: the eval forwards on the CPU) trains the deltas, W0 stays what
    the plugin quantized, and the saved adapter says which base it was trained on."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from lightning.pytorch.plugins import BitsandbytesPrecision

    module = TinyLM()
    plain = {n: m.weight.detach().clone() for n, m in module.named_modules() if type(m) is nn.Linear}
    plugin = BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16, ignore_modules={"model.lm_head"})
    callback = RoCoFT(mode="row", rank=2, adapter_dir=str(tmp_path / "adapter"))
    trainer = bnb_trainer(plugin, callback, tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=1,
                          num_sanity_val_steps=1)
    trainer.fit(module, token_loader(), token_loader())
    layers = rocoft_layers(module)
    assert len(layers) == 14
    for name, layer in layers.items():
        assert quantization_kind(layer.base) == "bnb-nf4" and layer.base.weight.quant_state.nested
        assert layer.delta.dtype == torch.float32 and layer.delta.abs().sum() > 0
        data, state = quantize_4bit(plain[f"{name}"], blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(dequantized_weight(layer.base), dequantize_4bit(data, state)), name  # W0: untouched
    assert type(module.model.lm_head) is nn.Linear  # ignored by the plugin
    note = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model"]["quantization"]
    assert note["kinds"][0]["kind"] == "bnb-nf4" and note["kinds"][0]["double_quant"] is True


def test_bitsandbytes_precision_refuses_what_it_would_break_before_anything_changes(tmp_path):
    from lightning.pytorch.plugins import BitsandbytesPrecision

    from conftest import TinyClassifier

    module = TinyClassifier()
    trainer = bnb_trainer(BitsandbytesPrecision("nf4"), RoCoFT(mode="row", rank=1), tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"trained head \['model.classifier'\].*ignore_modules=\{'model.classifier'\}"):
        trainer.fit(module, token_loader())
    assert not rocoft_layers(module)
    module = TinyLM()
    plugin = BitsandbytesPrecision("nf4", ignore_modules={"model.lm_head"})
    trainer = bnb_trainer(plugin, RoCoFT(mode="row", rank=1, train_bias=True), tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="train_bias does not work with BitsandbytesPrecision"):
        trainer.fit(module, token_loader())
    assert not rocoft_layers(module)


# -- the CLI switch: model.init_args.quantization ------------------------------------------------------------------


def test_cli_quantization_switch_fits_and_saves(tiny_dir, tmp_path):
    import yaml

    from rocoft_pl.cli import RoCoFTCLI

    config = {
        "model": {"class_path": "rocoft_pl.modules.causal_lm.CausalLMModule",
                  "init_args": {"model_name_or_path": str(tiny_dir), "learning_rate": 1e-2, "warmup_steps": 0,
                                "quantization": "nf4-dq", "quantization_options": {"compute_dtype": "bfloat16"}}},
        "data": {"class_path": "tasks.reasoning.ReasoningDataModule",
                 "init_args": {"train_datasets": ["math_10k"], "eval_datasets": ["gsm8k"], "batch_size": 2,
                               "max_length": 160, "data_files": {**tl.DATASET_FILES, **tl.MERGED_FILES},
                               "cache_dir": str(tmp_path / "datasets")}},
        "trainer": {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "limit_val_batches": 0, "enable_progress_bar": False, "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "rocoft_pl.RoCoFT",
                                   "init_args": {"mode": "column", "rank": 1, "adapter_dir": str(tmp_path / "adapter")}}]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = RoCoFTCLI(args=["fit", "--config", str(path)])
    layers = rocoft_layers(cli.model)
    assert len(layers) == 14 and all(quantization_kind(layer.base) == "bnb-nf4" for layer in layers.values())
    assert all(layer.base.compute_dtype == torch.bfloat16 for layer in layers.values())
    note = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model"]["quantization"]
    assert note["kinds"][0]["kind"] == "bnb-nf4" and note["quantized_targets"] == 14


def test_cli_quantization_settings_are_checked_before_loading():
    from rocoft_pl.modules.causal_lm import CausalLMModule

    with pytest.raises(ValueError, match="quantization must be one of"):
        CausalLMModule("nowhere", quantization="nf3")
    with pytest.raises(ValueError, match="unknown keys \\['compute'\\]"):
        CausalLMModule("nowhere", quantization="nf4", quantization_options={"compute": "bfloat16"})
    with pytest.raises(ValueError, match="init_on_meta"):
        CausalLMModule("nowhere", quantization="nf4", init_on_meta=True)


# -- memory: bytes per frozen parameter, checked on a loaded model --------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "fp4-dq", "int8"])
def test_quantized_bytes_per_layer_match_a_loaded_model(tiny_dir, kind):
    """benchmark.memory's arithmetic (packed values, scales, tables) against the tensors each layer of a loaded
    4-bit / 8-bit tiny Llama really holds, after a training step (LLM.int8 moves its scales on the first forward)."""
    from benchmark.memory import quantized_bytes_per_param, quantized_layer_bytes, quantized_linear_bytes

    model = load(tiny_dir, kind)
    apply_rocoft(model, RoCoFTConfig(mode="row", rank=1))
    train_steps(model, steps=1)
    layers = {n: m for n, m in model.named_modules() if is_quantized(m)}
    assert len(layers) == 14
    for name, module in layers.items():
        assert quantized_layer_bytes(module) == quantized_linear_bytes(module.out_features, module.in_features, kind), name
    expected = {"nf4": 0.5625, "nf4-dq": 0.5 + 1 / 64 + 4 / 64 / 256, "fp4-dq": 0.5 + 1 / 64 + 4 / 64 / 256, "int8": 1 + 4 / 4096}
    assert quantized_bytes_per_param(kind) == pytest.approx(expected[kind])
    big = quantized_linear_bytes(11008, 4096, kind) / (11008 * 4096)  # LLaMA-2-7B's MLP: the tables vanish
    assert big == pytest.approx(quantized_bytes_per_param(kind), rel=1e-4)


def first_row(table):
    line = next(line for line in table.splitlines() if line.startswith("| LLaMA-2-7B"))
    return [c.strip() for c in line.split("|")]


def test_memory_command_with_quantize(capsys):
    from benchmark.cli import main
    from benchmark.memory import LLM_CONFIGS, meta_model, quantized_layout

    assert main(["memory", "--gpus", "1", "--quantize", "nf4-dq"]) == 0
    quantized = first_row(capsys.readouterr().out)
    assert main(["memory", "--gpus", "1"]) == 0
    plain = first_row(capsys.readouterr().out)
    assert quantized[-2] == "nf4-dq" and plain[-2] == "bf16"
    states_q, states_b = float(quantized[5].split("(")[1][:-1]), float(plain[5].split("(")[1][:-1])
    layout = quantized_layout(meta_model(*LLM_CONFIGS["LLaMA-2-7B"][:1], **LLM_CONFIGS["LLaMA-2-7B"][1]), "nf4-dq")
    saved = layout["quantized_params"] * 2 - layout["quantized_bytes"]  # bf16 W0 -> NF4 with double quantisation
    assert states_b - states_q == pytest.approx(saved / 2**30, abs=0.01)
    assert layout["quantized_params"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)


# -- FSDP2 shards a 4-bit model (bnb_4bit_quant_storage=bfloat16), 2 gloo processes on the CPU ---------------------


def test_fsdp2_shards_a_4bit_base_and_trains_what_one_process_trains(tmp_path):
    """The configs/fsdp/*_nf4.yaml recipe in small: every process loads the model in NF4 with its packed weights
    stored as bf16, ModelParallelStrategy shards them (W0 and the deltas are DTensors), and the adapter equals a
    one-process run's on the same global batches to bf16 precision (bf16 compute; the existing bf16-true FSDP2
    runs are held to 1e-2 of the largest delta too)."""
    import dist_launch
    from safetensors.torch import load_file

    from conftest import assert_adapters_close

    script = Path(__file__).parent / "scripts" / "fit_quantized_fsdp.py"
    dist_launch.run_script(script, "2", tmp_path, timeout=300)
    dist_launch.run_script(script, "1", tmp_path, timeout=300)
    sharded, single = (json.loads((tmp_path / r / "info.json").read_text()) for r in ("run2", "run1"))
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    assert (sharded["w0_type"], sharded["w0_dtype"], sharded["delta_type"]) == ("DTensor", "bfloat16", "DTensor")
    assert (single["w0_type"], single["w0_dtype"]) == ("Params4bit", "bfloat16")
    assert sharded["delta_dtype"] == single["delta_dtype"] == "float32" and "Linear4bit" in sharded["base_class"]
    got, ref = (load_file(tmp_path / r / "adapter" / "adapter_model.safetensors") for r in ("run2", "run1"))
    assert all(ref[k].abs().sum() > 0 for k in ref if k.endswith(".delta"))
    assert_adapters_close(got, ref, tol=2e-2)
    metas = [json.loads((tmp_path / r / "adapter" / "adapter_config.json").read_text())["base_model"] for r in ("run2", "run1")]
    note = metas[0]["quantization"]
    assert note["kinds"][0]["storage"] == "bfloat16" and note["kinds"][0]["double_quant"] is True
    # the sharded packed weights count as the (out x in) they stand for: the adapter loads onto the plain base
    assert metas[0]["fingerprint"] == metas[1]["fingerprint"]
    load_adapter(load(tmp_path / "base"), tmp_path / "run2" / "adapter")


# -- rocoft-bench efficiency --quantize: every method over the same quantized W0 (no timings checked) -------------


def test_efficiency_benchmark_over_a_quantized_base(tmp_path):
    from benchmark.cli import main
    from benchmark.efficiency import QUANTIZED_METHODS, build_base

    argv = ["efficiency", "--model", "bert-tiny-config", "--batch-size", "2", "--seq-len", "16", "--repeats", "1",
            "--warmup", "0", "--device", "cpu", "--quantize", "nf4", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    data = json.loads((tmp_path / "out" / "efficiency.json").read_text())
    rows = {row["method"]: row for row in data["methods"]}
    assert list(rows) == list(QUANTIZED_METHODS) and data["setup"]["quantize"] == "nf4"
    assert data["setup"]["base_params"] == sum(p.numel() for p in build_base("bert-tiny-config").parameters())
    model = build_base("bert-tiny-config")
    assert rows["rocoft-row-r3"]["rocoft_params"] == apply_rocoft(model, RoCoFTConfig(mode="row", rank=3)).rocoft_params
    for name in ("rocoft-row-r3", "rocoft-column-r1", "lora-r8"):  # trained, saved, merged (RoCoFT: into a plain model)
        assert rows[name]["adapter_bytes"] > 0 and rows[name]["merged_infer_vs_base"] > 0
    assert rows["rocoft-column-r3"]["saved_activation_bytes"] < rows["rocoft-row-r3"]["saved_activation_bytes"]
    with pytest.raises(SystemExit, match="train a dense W0"):
        main([*argv[:-2], "--methods", "floor,full", "--output-dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
