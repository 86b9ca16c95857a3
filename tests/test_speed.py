"""Speed options (wavflow/speed.py): the reference values are today's eager path bit for bit;
the fast values compute the same thing to float rounding; bad values fail with the key."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.test_train_common import make_config, make_dataset
from wavflow.errors import ConfigError
from wavflow.model import build_model
from wavflow.model.layers import ChannelLastConv1d, conv1d_channel_last_as_matmul
from wavflow.speed import SpeedOptions, make_adamw, resolve_optimizer_impl, sdpa_context, set_attention_impl, set_conv_impl
from wavflow.train.ema import ParamEMA
from wavflow.train.trainer import Trainer

REFERENCE = dict(training__optimizer_impl="default", training__ema_impl="loop", training__conv_impl="native",
                 training__attention_backend="auto", training__compile=False)
FAST = dict(training__optimizer_impl="fused", training__ema_impl="foreach", training__conv_impl="matmul",
            training__attention_backend="math")


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("cin,cout,k,pad,length", [(5, 7, 3, 1, 9), (6, 4, 7, 3, 11), (3, 8, 1, 0, 5), (4, 4, 3, 0, 8)])
def test_matmul_conv_equals_conv1d_forward_and_backward(cin, cout, k, pad, length):
    conv = ChannelLastConv1d(cin, cout, k, padding=pad)
    x = torch.randn(2, length, cin, requires_grad=True)
    ref = conv(x)
    assert torch.equal(ref, F.conv1d(x.permute(0, 2, 1), conv.weight, conv.bias, padding=pad).permute(0, 2, 1))
    grads_ref = torch.autograd.grad(ref.square().sum(), (x, conv.weight, conv.bias))
    set_conv_impl(conv, "matmul")
    out = conv(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias)), grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv1d_channel_last_as_matmul(x, conv.weight, None, pad),
                               ref - conv.bias, rtol=1e-5, atol=1e-6)


def test_network_with_fast_options_matches_reference_fp32_and_bf16():
    kw = dict(latent_seq_len=12, clip_seq_len=8, sync_seq_len=16, text_seq_len=8, clip_dim=32, sync_dim=24, text_dim=32)
    torch.manual_seed(0)
    ref = _perturbed(build_model("tiny_16k", **kw))
    fast = copy.deepcopy(ref)
    assert set_conv_impl(fast, "matmul") > 20
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(3, 12, 200, generator=g), torch.randn(3, 8, 32, generator=g),
              torch.randn(3, 16, 24, generator=g), torch.randn(3, 8, 32, generator=g), torch.rand(3, generator=g))
    with torch.no_grad():
        want = ref(*inputs)
    with sdpa_context("math"):
        got = fast(*inputs)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_bf = ref(*inputs).float()
        got_bf = fast(*inputs).float()
    # bf16 has 8 mantissa bits: both paths sit within bf16 rounding of the fp32 result
    assert (got_bf - want).abs().max() < 0.05 * scale
    assert (want_bf - want).abs().max() < 0.05 * scale


def test_matmul_attention_matches_sdpa_forward_and_backward():
    from wavflow.model.layers import matmul_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 64, generator=g, requires_grad=True) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v)
    got = matmul_attention(q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    grads_want = torch.autograd.grad(want.square().sum(), (q, k, v))
    grads_got = torch.autograd.grad(got.square().sum(), (q, k, v))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # under bf16 autocast: bf16 GEMMs, output within bf16 rounding of the fp32 result
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = matmul_attention(q, k, v)
    assert low.dtype == torch.bfloat16
    assert (low.float() - want).abs().max() < 0.05 * want.abs().max()


def test_attention_backend_matmul_routes_the_network_through_matmul_attention(monkeypatch):
    from wavflow.model import layers

    calls = []
    real = layers.matmul_attention
    monkeypatch.setattr(layers, "matmul_attention", lambda *a: calls.append(1) or real(*a))
    kw = dict(latent_seq_len=12, clip_seq_len=8, sync_seq_len=16, text_seq_len=8, clip_dim=32, sync_dim=24, text_dim=32)
    torch.manual_seed(0)
    model = _perturbed(build_model("tiny_16k", **kw))
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(3, 12, 200, generator=g), torch.randn(3, 8, 32, generator=g),
              torch.randn(3, 16, 24, generator=g), torch.randn(3, 8, 32, generator=g), torch.rand(3, generator=g))
    other = copy.deepcopy(model)  # a second model in the same process keeps its own choice
    with torch.no_grad():
        want = model(*inputs)
        assert not calls
        assert set_attention_impl(model, "matmul") > 0
        got = model(*inputs)
        n = len(calls)
        assert n > 0
        torch.testing.assert_close(other(*inputs), want, rtol=0, atol=0)  # SDPA, bit for bit
        set_attention_impl(model, "flash")  # any SDPA backend: SDPA again
        model(*inputs)
    assert len(calls) == n
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_foreach_ema_is_bit_identical_to_the_loop():
    model = _perturbed(torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)))
    loop, each = ParamEMA(model, 0.999, warmup=True), ParamEMA(model, 0.999, warmup=True, foreach=True)
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1).add_(torch.randn_like(p))
        loop.update(model, step)
        each.update(model, step)
    for a, b in zip(loop.shadow, each.shadow):
        assert torch.equal(a, b)
    assert not torch.equal(loop.shadow[0], model[0].weight)  # it did average


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_adamw_kernels_agree_with_the_default_loop(impl):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.SiLU(), torch.nn.Linear(9, 4))
    other = copy.deepcopy(model)
    groups = lambda m: [{"params": [m[0].bias, m[2].bias], "weight_decay": 0.0},  # noqa: E731
                        {"params": [m[0].weight, m[2].weight], "weight_decay": 0.05}]
    opt_ref = make_adamw(groups(model), "default", lr=1e-2, betas=(0.9, 0.95))
    opt = make_adamw(groups(other), impl, lr=1e-2, betas=(0.9, 0.95))
    assert opt.defaults[impl] is True and not opt_ref.defaults["fused"] and not opt_ref.defaults["foreach"]
    for _ in range(5):
        x = torch.randn(8, 6)
        for m, o in ((model, opt_ref), (other, opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert not torch.equal(model[0].weight, copy.deepcopy(model)[0].weight.add(1))  # sanity


def _step_pair(tmp_path, fast: dict, **extra):
    csv = make_dataset(tmp_path / "data")
    common = dict(training__warmup_steps=0, training__clip_grad_norm=0.5, training__weight_decay=0.01, **extra)
    a = Trainer(make_config(tmp_path / "a", csv, **REFERENCE, **common))
    b = Trainer(make_config(tmp_path / "b", csv, **{**REFERENCE, **fast}, **common))
    b.model.load_state_dict(_perturbed(a.model).state_dict())
    for t in (a, b):
        t.ema1.reset_to(t.model)
        t.ema2.reset_to(t.model)
    from wavflow.train.dataset import collate_train

    batch = collate_train([a.dataset[i] for i in range(4)])
    stats = [(t.step.update([batch], lr_epoch=0.0), t.step.update([batch], lr_epoch=0.0)) for t in (a, b)]
    return a, b, stats


def test_trainer_reference_options_build_todays_objects(tmp_path):
    csv = make_dataset(tmp_path / "data")
    tr = Trainer(make_config(tmp_path, csv, **REFERENCE))
    assert tr.speed.is_reference()
    assert tr.optimizer.defaults["foreach"] is None and tr.optimizer.defaults["fused"] is None
    assert not tr.ema1.foreach and not tr.ema2.foreach
    convs = [m for m in tr.model.modules() if isinstance(m, ChannelLastConv1d)]
    assert convs and all(m.conv_impl == "native" for m in convs)
    assert tr.forward_model is tr.model


def test_optimizer_auto_is_fused_on_cuda_and_the_reference_on_cpu(tmp_path):
    """configs/train.yaml's optimizer_impl=auto: fused where it is faster (CUDA), PyTorch's own
    choice elsewhere, so the default CPU config builds the reference's AdamW."""
    assert resolve_optimizer_impl("auto", torch.device("cuda", 0)) == "fused"
    assert resolve_optimizer_impl("auto", torch.device("cpu")) == "default"
    assert resolve_optimizer_impl("foreach", torch.device("cuda")) == "foreach"  # explicit values stay
    with pytest.raises(ValueError, match="resolve auto first"):
        make_adamw([torch.nn.Parameter(torch.zeros(2))], "auto")
    csv = make_dataset(tmp_path / "data")
    tr = Trainer(make_config(tmp_path, csv))  # configs/train.yaml's speed options, on CPU
    assert tr.speed.optimizer_impl == "auto"
    assert tr.optimizer.defaults["foreach"] is None and tr.optimizer.defaults["fused"] is None


def test_trainer_foreach_ema_step_is_bit_identical(tmp_path):
    a, b, _ = _step_pair(tmp_path, dict(training__ema_impl="foreach"))
    for name, pa, pb in zip(a.ema1.names, a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name
    for e in ("ema1", "ema2"):
        for x, y in zip(getattr(a, e).shadow, getattr(b, e).shadow):
            assert torch.equal(x, y)


def test_trainer_fast_options_step_matches_reference(tmp_path):
    a, b, stats = _step_pair(tmp_path, FAST)
    assert b.optimizer.defaults["fused"] is True and b.ema1.foreach and b.ema2.foreach
    assert all(m.conv_impl == "matmul" for m in b.model.modules() if isinstance(m, ChannelLastConv1d))
    (a1, a2), (b1, b2) = stats
    assert b1["loss"] == pytest.approx(a1["loss"], rel=1e-5)
    assert b1["grad_norm"] == pytest.approx(a1["grad_norm"], rel=1e-4)
    assert b2["loss"] == pytest.approx(a2["loss"], rel=1e-4)
    assert a1["grad_norm"] > 0.5  # clipping active
    lr = 1e-4
    moved = 0
    for name, pa, pb, e in zip(a.ema1.names, a.model.parameters(), b.model.parameters(), a.ema1.shadow):
        # Adam steps are ~lr per step whatever the gradient size: allow a fraction of one step
        torch.testing.assert_close(pb, pa, rtol=0, atol=0.2 * lr, msg=name)
        moved += int(not torch.equal(pa, e))
    assert moved > 0
    for x, y in zip(a.ema2.shadow, b.ema2.shadow):
        torch.testing.assert_close(y, x, rtol=0, atol=0.2 * lr)


@pytest.mark.parametrize("key,value", [("optimizer_impl", "apex"), ("ema_impl", "fast"), ("conv_impl", "fft"),
                                       ("attention_backend", "xformers"), ("compile", "maybe")])
def test_bad_speed_option_is_a_config_error_naming_the_key(tmp_path, key, value):
    csv = make_dataset(tmp_path / "data")
    with pytest.raises(ConfigError, match=f"training.{key}"):
        Trainer(make_config(tmp_path, csv, **{f"training__{key}": value}))
    assert SpeedOptions.from_config({}, "x").is_reference()


@pytest.mark.parametrize("attention", ["math", "matmul"])
def test_generator_fast_options_match_reference_sampling(attention):
    from tests.test_predict import perturbed_state_dict, tiny_cfg
    from wavflow.generator import ConditionFeatures, WavFlowGenerator
    from wavflow.model import build_model_from_config

    cfg = tiny_cfg()
    sd = perturbed_state_dict(cfg, 1)
    gens = {}
    for name, extra in (("ref", []), ("fast", ["inference.conv_impl=matmul", f"inference.attention_backend={attention}"])):
        c = tiny_cfg(*extra)
        model = build_model_from_config(c)
        model.load_state_dict(sd)
        gens[name] = WavFlowGenerator(model, c, device="cpu")
    assert gens["ref"].speed.is_reference()
    g = torch.Generator().manual_seed(0)
    m = gens["ref"].model
    items = [ConditionFeatures(clip=torch.randn(m.clip_seq_len, m.clip_dim, generator=g),
                               sync=torch.randn(m.sync_seq_len, m.sync_dim, generator=g),
                               text=torch.randn(m.text_seq_len, m.text_dim, generator=g)), ConditionFeatures()]
    ref = gens["ref"].generate_batch(items, [1, 2], cfg=4.5, steps=3)
    fast = gens["fast"].generate_batch(items, [1, 2], cfg=4.5, steps=3)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    assert ref.abs().mean() > 1e-3


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_sampling_matches_eager_and_does_not_recompile():
    from tests.test_predict import perturbed_state_dict, tiny_cfg
    from torch._dynamo.utils import counters
    from wavflow.generator import ConditionFeatures, WavFlowGenerator
    from wavflow.model import build_model_from_config

    torch._dynamo.reset()
    cfg_e, cfg_c = tiny_cfg(), tiny_cfg("inference.compile=true", "inference.conv_impl=matmul")
    sd = perturbed_state_dict(cfg_e, 1)
    gens = []
    for c in (cfg_e, cfg_c):
        model = build_model_from_config(c)
        model.load_state_dict(sd)
        gens.append(WavFlowGenerator(model, c, device="cpu"))
    items = [ConditionFeatures()]
    eager = gens[0].generate_batch(items, [5], cfg=3.0, steps=2)
    first = gens[1].generate_batch(items, [5], cfg=3.0, steps=2)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    again = gens[1].generate_batch(items, [6], cfg=3.0, steps=2)  # same shapes: no new graph
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-4 * float(eager.abs().max()))
    assert not torch.equal(again, first)


def _load_bench_script(name: str):
    """A script of scripts/bench as a module (they import each other by file name)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "scripts" / "bench"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module



@pytest.mark.slow
def test_bench_model_times_the_real_paths_and_writes_the_json_keys(tmp_path):
    import json

    bench = _load_bench_script("bench_model")
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny_16k", "--batch", "2", "--duration", "1", "--dtype", "fp32", "--repeats", "1",
                "--warmup", "1", "--sample-steps", "1", "--data-batches", "3", "--threads", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    for name in ("train_step", "forward", "sampling", "sampling_reference", "data"):
        assert "fraction_of_dense_matmul" in res["phases"][name], name
    step = res["phases"]["train_step"]
    assert step["flops"] > 3 * res["phases"]["forward"]["flops"] * 0.5 > 0  # fwd + bwd ~ 3x forward
    assert res["main"]["train_step"]["seconds"] > 0 and "speedup_vs_main" in step
    assert step["max_param_diff_vs_main"] < 1e-3  # same start, same noise, fp32: close after 2 steps
    assert res["phases"]["sampling"]["max_abs_diff_vs_reference"] < 1e-3 * max(res["phases"]["sampling"]["output_abs_max"], 1e-3) + 1e-4
    data = res["phases"]["data"]
    # the first batch (start-up) is timed apart; the steady rate counts the other two batches
    assert data["samples_per_s"] > 0 and data["startup_seconds"] > 0 and data["rows"] == 2 * 2
    assert data["starves_trainer"] == (data["samples_per_s"] < step["samples_per_s"])


@pytest.mark.slow
def test_bench_model_times_the_new_sampling_path_at_its_own_steps_and_precision(tmp_path):
    """--fast-sample-steps/--fast-sample-dtype: the new path's generate_batch runs its own step
    count and precision against main and the reference loop at --sample-steps in fp32."""
    import json

    bench = _load_bench_script("bench_model")
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny_16k", "--batch", "2", "--duration", "1", "--phases", "sampling", "--repeats", "1",
                "--warmup", "0", "--sample-steps", "4", "--fast-sample-steps", "2", "--fast-sample-dtype", "bf16",
                "--cfg", "1.0", "--threads", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    new, main, ref = res["phases"]["sampling"], res["main"]["sampling"], res["phases"]["sampling_reference"]
    assert (new["steps"], new["dtype"]) == (2, "bf16") and (main["steps"], main["dtype"]) == (4, "fp32")
    assert ref["steps"] == 4 and ref["flops"] == main["flops"] == 2 * new["flops"] > 0  # cfg 1: one pass per step
    # the fraction of the matmul rate is taken against the rate of each variant's own precision
    mm = res["dense_matmul_flops_per_s_by_dtype"]
    assert new["fraction_of_dense_matmul"] == pytest.approx(new["achieved_flops_per_s"] / mm["bf16"])
    assert main["fraction_of_dense_matmul"] == pytest.approx(main["achieved_flops_per_s"] / mm["fp32"])
    # half the Euler steps of the same ODE: a different result, not the reference's rounding
    assert new["max_abs_diff_vs_reference"] > main["max_abs_diff_vs_reference"]
    with pytest.raises(SystemExit):  # 0 steps is an error, not the default
        bench.parse_args(["--fast-sample-steps", "0"])


def test_flop_count_includes_the_cpu_attention_kernels_forward_and_backward():
    """On CPU, SDPA runs kernels torch's FLOP registry does not know; bench_model must still
    count them: forward 2 GEMMs (4·B·H·L·S·D), backward 5 (10·B·H·L·S·D: the scores again,
    dV, dP, dQ, dK)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bench = _load_bench_script("bench_model")
    b, h, length, d = 2, 4, 50, 16
    q, k, v = (torch.randn(b, h, length, d, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        forward = bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        both = bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward())
    assert forward == 4 * b * h * length * length * d
    assert both == 14 * b * h * length * length * d


@pytest.mark.slow
def test_kernel_ceiling_replays_every_flop_kernel_of_the_real_step(tmp_path):
    """The recorded kernels carry exactly the step's FLOPs (none missed, none counted twice),
    every family of the network is there, and the ceiling is the formula of its definition."""
    import json

    ceiling = _load_bench_script("kernel_ceiling")
    out = tmp_path / "ceiling.json"
    ceiling.main(["--preset", "tiny_16k", "--batch", "2", "--dtype", "fp32", "--repeats", "1", "--warmup", "0",
                  "--threads", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["step_flops"] == res["step_flops_counted"] > 0
    assert {"mm", "convolution", "convolution_backward", "attention", "attention_backward"} <= set(res["groups"])
    assert sum(g["flops"] for g in res["groups"].values()) == res["step_flops"]
    assert sum(g["seconds"] for g in res["groups"].values()) == pytest.approx(res["kernel_seconds"])
    assert res["ceiling_fraction_of_dense_matmul"] == pytest.approx(
        res["step_flops"] / res["kernel_seconds"] / res["dense_matmul_flops_per_s"])
    assert res["max_speedup_without_glue"] == pytest.approx(res["step_seconds"] / res["kernel_seconds"])
    # the im2col convolutions and math attention leave only GEMMs
    fast = ceiling.main(["--preset", "tiny_16k", "--batch", "2", "--dtype", "fp32", "--repeats", "1", "--warmup", "0",
                         "--threads", "1", "--options", "conv_impl=matmul,attention_backend=math"])
    assert set(fast["groups"]) == {"mm"} and fast["step_flops"] == fast["step_flops_counted"]
