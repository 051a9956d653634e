"""Attention backends: every backend that runs here equals per-sequence softmax attention (outputs and gradients,
ragged and uniform packings, strided q/k/v) and leaves the encoder and predictor unchanged; config and env select
one; backends that cannot run fail clearly; auto's table lookup and the script that writes the table."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from benchmarks import attention_table
from engine.config import ConfigError, load_config
from models import Packing, Predictor, PredictorLayout, Variant, VisionTransformer, attention
from models import attention_backends
from models.attention_backends import BackendUnavailable

RUN_HERE = ("reference", "sdpa", "sdpa_math", "sdpa_flash", "sdpa_padded", "triton")  # a CPU's (triton interpreted)
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture(autouse=True)
def _fresh_selection(monkeypatch):
    """No VJEPA_ATTENTION from the caller's shell; set_backend() and auto's cache are undone after each test."""
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    monkeypatch.setattr(attention, "_configured", "auto")
    attention._auto.cache_clear()
    yield
    attention._auto.cache_clear()


def _skip_unless_runs_here(name: str) -> None:
    """One tiny call decides; the reason becomes the skip message (CUDA-only kernels, packages not installed)."""
    qkv = torch.randn(4, 3, 1, 16)
    try:
        attention.BACKENDS[name](qkv[:, 0], qkv[:, 1], qkv[:, 2], Packing.uniform(1, 4))
    except (ImportError, BackendUnavailable) as e:
        pytest.skip(f"does not run on this machine: {e}")
    except NotImplementedError:  # kernels/varlen_attention.py before its Triton kernel lands
        pytest.skip("kernel not landed")


def _per_sequence(q, k, v, lengths):
    out, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        att = torch.einsum("qhd,khd->hqk", q[s], k[s]) * q.shape[-1] ** -0.5
        out.append(torch.einsum("hqk,khd->qhd", att.softmax(-1), v[s]))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("layout", ["T3HD", "TH3D"])  # the model's qkv view, and another strided one
@pytest.mark.parametrize("lengths, head_dim", [([1, 7, 3, 7, 13, 33], 24), ([16, 16, 16], 32)],
                         ids=["ragged", "uniform"])
@pytest.mark.parametrize("name", list(attention.BACKENDS))
def test_backend_matches_per_sequence_attention(name, lengths, head_dim, layout):
    _skip_unless_runs_here(name)
    torch.manual_seed(0)
    total, heads = sum(lengths), 2
    if layout == "T3HD":
        qkv = torch.randn(total, 3, heads, head_dim, requires_grad=True)
        q, k, v = qkv.unbind(1)
    else:
        qkv = torch.randn(total, heads, 3, head_dim, requires_grad=True)
        q, k, v = qkv.unbind(2)
    out = attention.BACKENDS[name](q, k, v, Packing.from_seqlens(lengths))
    ref = _per_sequence(q, k, v, lengths)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(ref)
    (grad,), (grad_ref,) = torch.autograd.grad(out, qkv, g), torch.autograd.grad(ref, qkv, g)
    torch.testing.assert_close(grad, grad_ref, atol=2e-5, rtol=2e-5)


def _encoder_and_predictor_outputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A ragged encoder call (head dim 24) and a uniform predictor call (head dim 32) under backend `name`."""
    attention.set_backend(name)
    torch.manual_seed(0)
    enc = VisionTransformer(Variant(48, 2, 2), img_size=16, num_frames=4, patch_size=4, tubelet_size=2)
    n, b = enc.num_tokens, 2  # 2 * 4 * 4 = 32 tokens per clip
    pred = Predictor(48, enc.grid, pred_dim=64, depth=2, num_heads=2, num_mask_tokens=2)
    video = torch.randn(b, 3, 4, 16, 16)
    gen = torch.Generator().manual_seed(1)
    ctx, tgt = [], []
    for g in range(2):
        for clip in range(b):
            perm = torch.randperm(n, generator=gen)
            keep = 6 + 5 * g + 3 * clip  # different context lengths: a ragged encoder packing
            ctx.append(perm[:keep].sort().values + clip * n)
            tgt.append(perm[keep:].sort().values + clip * n)
    ctx_index, tgt_index = torch.cat(ctx), torch.cat(tgt)
    z = enc(video, ctx_index, Packing.from_seqlens([len(c) for c in ctx]))
    layout = PredictorLayout.build([len(c) for c in ctx], [len(t) for t in tgt], b)
    assert layout.packing.is_uniform
    return z, pred(z, ctx_index, tgt_index, layout)


@pytest.mark.parametrize("name", [n for n in attention.BACKENDS if n != "reference"])
def test_encoder_and_predictor_equal_under_every_backend(name):
    _skip_unless_runs_here(name)
    z, p = _encoder_and_predictor_outputs(name)
    z_ref, p_ref = _encoder_and_predictor_outputs("reference")
    torch.testing.assert_close(z, z_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(p, p_ref, atol=2e-5, rtol=2e-5)


def test_cpu_runs_the_expected_backends():
    """The list above is what the README calls verified on CPU: a backend that stops running here must fail."""
    qkv = torch.randn(4, 3, 1, 16)
    for name in RUN_HERE:
        attention.BACKENDS[name](qkv[:, 0], qkv[:, 1], qkv[:, 2], Packing.from_seqlens([1, 3]))


@pytest.mark.parametrize("name", ["sdpa_cudnn", "sdpa_efficient", "torch_varlen"])
def test_cuda_only_backends_fail_clearly_on_cpu(name):
    qkv = torch.randn(4, 3, 1, 16)
    with pytest.raises(BackendUnavailable, match=rf"'{name}'.*cpu.*model.attention.*'auto'"):
        attention.BACKENDS[name](qkv[:, 0], qkv[:, 1], qkv[:, 2], Packing.uniform(1, 4))


def test_triton_on_cpu_without_the_interpreter_fails_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qkv = torch.randn(4, 3, 1, 16)
    with pytest.raises(BackendUnavailable, match=r"'triton' needs CUDA.*model.attention"):
        attention.BACKENDS["triton"](qkv[:, 0], qkv[:, 1], qkv[:, 2], Packing.uniform(1, 4))


@pytest.mark.parametrize("name, module, package", [("flash_attn", "flash_attn", "flash-attn"),
                                                    ("xformers", "xformers", "xformers")])
def test_missing_package_names_package_and_switch(monkeypatch, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import fails whether or not it is installed
    qkv = torch.randn(4, 3, 1, 16)
    with pytest.raises(ImportError, match=rf"'{name}' needs the {package} package.*model.attention"):
        attention.BACKENDS[name](qkv[:, 0], qkv[:, 1], qkv[:, 2], Packing.uniform(1, 4))


def test_env_overrides_the_configured_backend(monkeypatch):
    calls = []
    monkeypatch.setitem(attention.BACKENDS, "reference", lambda q, k, v, p: calls.append("reference") or q)
    attention.set_backend("sdpa_math")
    assert attention.selected_backend() == "sdpa_math"
    monkeypatch.setenv(attention.ENV_VAR, "reference")
    qkv = torch.randn(4, 3, 1, 16)
    attention.packed_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], Packing.uniform(1, 4))
    assert attention.selected_backend() == "reference" and calls == ["reference"]
    assert attention.describe(torch.device("cpu"), torch.float32, {"dense_target": 16}) == "reference"
    monkeypatch.setenv(attention.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="VJEPA_ATTENTION='fastest'.*sdpa_cudnn"):
        attention.selected_backend()
    with pytest.raises(ValueError, match="model.attention='fast'"):
        attention.set_backend("fast")


def test_config_key_is_validated():
    assert load_config().model.attention == "auto"
    assert load_config(overrides=["--model.attention=sdpa_padded"]).model.attention == "sdpa_padded"
    with pytest.raises(ConfigError, match="model.attention 'fast'.*triton.*reference"):
        load_config(overrides=["--model.attention=fast"])


def test_auto_on_cpu_is_the_default_sdpa_grouped_by_length(monkeypatch):
    calls = []
    monkeypatch.setitem(attention.BACKENDS, "sdpa", lambda q, k, v, p: calls.append(p.seqlens) or q)
    qkv = torch.randn(5, 3, 1, 16)
    attention.packed_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], Packing.from_seqlens([2, 3]))
    assert calls == [(2, 3)]
    line = attention.describe(torch.device("cpu"), torch.float32, {"ragged_context": 16, "dense_predictor": 24})
    assert line.startswith("auto -> sdpa (no CUDA device")


def test_case_from_packing_and_head_dim():
    assert attention.attention_case(Packing.from_seqlens([3, 4]), 64) == "ragged_context"
    assert attention.attention_case(Packing.uniform(4, 8), 24) == "dense_predictor"
    assert attention.attention_case(Packing.uniform(4, 8), 32) == "dense_predictor"
    assert attention.attention_case(Packing.uniform(4, 8), 80) == "dense_target"
    names = (H100, "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090")
    assert [attention.device_kind(n) for n in names] == ["H100", "H200", "A100", "4090"]


def test_grouping_indices_live_on_the_packings_device_once():
    # the meta device stands in for a GPU: the indices must follow cu_seqlens there, built once for all layers
    host = Packing.from_seqlens([3, 1, 3, 2])
    packing = Packing(host.seqlens, host.cu_seqlens.to("meta"), host.max_seqlen)
    groups, order, inverse = packing.length_groups
    assert groups == ((3, 2), (1, 1), (2, 1))
    assert order.device.type == inverse.device.type == packing.padded_rows.device.type == "meta"
    assert packing.length_groups[1] is order and packing.padded_rows is packing.padded_rows
    _, host_order, host_inverse = host.length_groups
    assert host_order.tolist() == [0, 1, 2, 4, 5, 6, 3, 7, 8]
    assert host_order[host_inverse].tolist() == list(range(9))


def _result(shape, case, head_dim, direction, provider, median, device=H100, interpreted=False):
    return {"extra_info": {"op": "attention", "case": shape, "attention_case": case, "head_dim": head_dim,
                           "direction": direction, "provider": provider, "device": device, "interpreted": interpreted},
            "stats": {"median": median}}


# (shape, case, head dim, direction) -> {provider: median s}: two shapes share H100/dense_predictor/24 and disagree on
# the fastest; the rows in other directions, the non-candidates and the interpreted run must not matter
FAKE = {
    ("vitl-V1", "dense_predictor", 24, "fwd+bwd"): {"triton": 1.00, "sdpa_cudnn": 1.03, "sdpa_flash": 1.5,
                                                    "sdpa_padded": 0.5, "reference": 0.1},
    ("vith-V1", "dense_predictor", 24, "fwd+bwd"): {"triton": 1.20, "sdpa_cudnn": 1.00, "sdpa_flash": 1.1},
    ("vitl-V1", "dense_predictor", 24, "fwd"): {"sdpa_flash": 0.1, "triton": 1.0, "sdpa_cudnn": 1.0},
    ("vitl-ctx", "ragged_context", 64, "fwd+bwd"): {"triton": 1.0, "torch_varlen": 1.02, "sdpa": 1.4},
    ("vith-tgt", "dense_target", 80, "fwd"): {"sdpa_flash": 0.90, "sdpa_cudnn": 0.95, "triton": 1.0},
    ("vith-tgt", "dense_target", 80, "fwd+bwd"): {"triton": 0.1, "sdpa_flash": 1.0},
}


@pytest.mark.usefixtures("recent_cudnn")
def test_table_script_and_auto_pick_within_5_percent_of_the_best(tmp_path, capsys):
    results = [_result(*key, p, m) for key, medians in FAKE.items() for p, m in medians.items()]
    results.append(_result("tiny", "ragged_context", 16, "fwd+bwd", "sdpa", 1.0, device="x86_64", interpreted=True))
    bench = tmp_path / "bench_attention.json"
    bench.write_text(json.dumps({"benchmarks": results}))
    out = tmp_path / "table.json"
    out.write_text(json.dumps({"about": "x", "sources": [], "table": {"H200": {"dense_target": {"80": "triton"}}}}))
    attention_table.main([str(bench), "--out", str(out)])
    assert "warning" not in capsys.readouterr().out
    table = json.loads(out.read_text())["table"]
    assert table == {"H200": {"dense_target": {"80": "triton"}},  # another GPU kind's entries are kept
                     "H100": {"dense_predictor": {"24": "sdpa_cudnn"}, "dense_target": {"80": "sdpa_flash"},
                              "ragged_context": {"64": "triton"}}}

    for (_, case, head_dim, direction), medians in FAKE.items():
        if direction != attention_table.TRAINING_DIRECTION[case]:
            continue
        choice = attention.auto_choice(case, head_dim, torch.bfloat16, kind=attention.device_kind(H100),
                                       capability=(9, 0), table=table)
        assert "attention_table.json entry H100" in choice.rule
        candidates = {p: m for p, m in medians.items() if p not in attention_table.NOT_CANDIDATES}
        assert medians[choice.backend] <= 1.05 * min(candidates.values())


def test_table_warns_when_no_backend_is_within_5_percent_everywhere():
    results = [{**r["extra_info"], "median_s": r["stats"]["median"]} for r in (
        _result("a", "dense_target", 64, "fwd", "triton", 1.0), _result("a", "dense_target", 64, "fwd", "sdpa", 2.0),
        _result("b", "dense_target", 64, "fwd", "triton", 2.0), _result("b", "dense_target", 64, "fwd", "sdpa", 1.0))]
    table, warnings = attention_table.build_table(results)
    assert table == {"H100": {"dense_target": {"64": "sdpa"}}} and "2.00x the fastest" in warnings[0]


@pytest.fixture
def recent_cudnn(monkeypatch):
    """The emulated H100's cuDNN: new enough for auto to pin its SDPA kernel (this CPU build has none)."""
    monkeypatch.setattr(attention_backends, "cudnn_version", lambda: 91900)


def test_auto_passes_over_cudnn_attention_before_9_15_1(monkeypatch):
    monkeypatch.setattr(attention_backends, "cudnn_version", lambda: 91002)
    choice = attention.auto_choice("dense_predictor", 24, torch.bfloat16, kind="H100", capability=(9, 0),
                                   table={"H100": {"dense_predictor": {"24": "sdpa_cudnn"}}})
    assert choice.backend == "sdpa_flash" and "cuDNN 9.15.1" in choice.rule and "91002" in choice.rule
    monkeypatch.setattr(attention_backends, "cudnn_version", lambda: 91501)
    assert attention.auto_choice("dense_predictor", 24, torch.bfloat16, kind="H100", capability=(9, 0),
                                 table={}).backend == "sdpa_cudnn"


@pytest.mark.usefixtures("recent_cudnn")
def test_auto_without_a_table_entry_takes_the_first_backend_that_runs():
    def pick(case, head_dim, dtype, table=None):
        return attention.auto_choice(case, head_dim, dtype, kind="H100", capability=(9, 0), table=table or {})

    assert pick("dense_predictor", 24, torch.bfloat16).backend == "sdpa_cudnn"
    assert pick("ragged_context", 80, torch.bfloat16).backend == "triton"
    fp32 = pick("dense_target", 64, torch.float32)  # cuDNN and flash SDPA need 16-bit inputs
    assert fp32.backend == "sdpa_efficient" and "sdpa_cudnn -> sdpa_flash -> sdpa_efficient" in fp32.rule
    assert pick("ragged_context", 64, torch.float32).backend == "sdpa"  # the Triton kernel is 16-bit on a GPU
    unusable = pick("dense_target", 64, torch.float32, {"H100": {"dense_target": {"64": "sdpa_cudnn"}}})
    assert unusable.backend == "sdpa_efficient" and "picks sdpa_cudnn" in unusable.rule and "float16" in unusable.rule


@pytest.mark.usefixtures("recent_cudnn")
def test_auto_reads_the_device_name_and_the_table(monkeypatch):
    """A fake CUDA device: the lookup goes device name -> kind -> table."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attention, "_table", lambda: {})
    cuda = torch.device("cuda", 0)
    head_dims = {"ragged_context": 64, "dense_target": 64, "dense_predictor": 24}
    line = attention.describe(cuda, torch.bfloat16, head_dims)
    assert "ragged_context (head dim 64) -> triton (no attention_table.json entry for H100/ragged_context" in line
    assert "dense_predictor (head dim 24) -> sdpa_cudnn" in line
    attention._auto.cache_clear()
    monkeypatch.setattr(attention, "_table", lambda: {"H100": {"dense_predictor": {"24": "triton"}}})
    choice = attention._auto("dense_predictor", 24, torch.bfloat16, cuda)
    assert choice == attention.Choice("triton", "attention_table.json entry H100/dense_predictor/head dim 24")


def test_shipped_table_names_known_cases_and_backends():
    table = attention._table()
    for kind, cases in table.items():
        assert set(cases) <= set(attention.CASES), kind
        for picks in cases.values():
            assert all(hd.isdigit() and b in attention.BACKENDS for hd, b in picks.items()), (kind, picks)
