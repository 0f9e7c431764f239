import math

import pytest
import torch

from gligen.bench.train_step import make_batch, make_module, make_optimizer, set_variant, tiny_size, variant_batch
from gligen.evaluation.results import append_csv
from tests.helpers import ROOT


def load_script():
    """experiments/bench_train.py's logic (the script is a shim that calls it)."""
    from gligen.experiments import bench_train

    return bench_train


def test_variants_differ_only_in_frozen_grads_and_inputs(tiny_pretrained):
    module = make_module(tiny_pretrained)
    batch = make_batch(module, tiny_size())
    grounding = module.grounding_names
    set_variant(module, "official")
    assert all(p.requires_grad for n, p in module.ldm.unet.named_parameters())
    assert not any(p.requires_grad for p in module.ldm.vae.parameters())
    set_variant(module, "ours")
    assert {n for n, p in module.named_parameters() if p.requires_grad} == grounding
    optimized = {id(p) for group in make_optimizer(module).param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in module.named_parameters() if n in grounding}
    assert "pixel_values" not in variant_batch(batch, "ours") and "latent_mean" in variant_batch(batch, "ours")
    assert "pixel_values" in variant_batch(batch, "official")
    assert "caption_embeds" not in variant_batch(batch, "official")


def check_row(row, lines):
    """What holds on every processor: the figures are positive and consistent with each other (MFU = FLOPs / peak /
    time), never how large they are (that depends on the processor)."""
    assert row["time_ours_s"] > 0 and row["time_official_s"] > 0
    assert row["time_ratio_ours_over_official"] == pytest.approx(row["time_ours_s"] / row["time_official_s"])
    assert row["flops_official"] > row["flops_ours"] > 0  # official adds encoders + UNet weight gradients
    assert math.isfinite(row["matmul_peak_flops"]) and row["matmul_peak_flops"] > 0
    assert row["mfu_official"] == pytest.approx(row["flops_official"] / row["matmul_peak_flops"]
                                                / row["time_official_s"])
    assert row["mfu_ours_vs_fp32_peak"] == pytest.approx(row["flops_ours"] / row["matmul_peak_flops"]
                                                         / row["time_ours_s"])
    assert row["torch"] == torch.__version__ and row["git_commit"]
    assert row["processor_class"] and isinstance(row["native_bf16"], bool) and "cpu_flags" in row
    assert "a/b time ratio" in "\n".join(lines) and "MFU official" in "\n".join(lines)


def test_bench_train_tiny(tmp_path):
    """The script's core on the tiny config, 1 repeat, no memory subprocesses (a few seconds)."""
    script = load_script()
    out = tmp_path / "train.csv"
    lines = []
    rows = script.run(["tiny"], repeats=1, device="cpu", memory=False, out=str(out), command="test",
                      peak_size=256, log=lines.append)
    check_row(rows[0], lines)
    assert rows[0]["mfu_ours"] == pytest.approx(rows[0]["mfu_ours_vs_fp32_peak"])  # fp32: one peak
    assert "mem_ours_mb" not in rows[0]
    append_csv(rows, out)  # appending keeps the earlier row
    assert len(out.read_text().strip().splitlines()) == 3


@pytest.mark.slow
def test_bench_train_tiny_memory(tmp_path):
    """With the per-variant memory subprocesses (each imports torch + diffusers: ~40 s on 2 cores)."""
    script = load_script()
    lines = []
    (row,) = script.run(["tiny"], repeats=1, device="cpu", out=None, peak_size=256, log=lines.append)
    check_row(row, lines)
    assert row["mem_ours_mb"] > 0 and row["mem_official_mb"] > 0
    assert 0 < row["mem_ratio_ours_over_official"] < 10
    assert "a/b memory ratio" in "\n".join(lines)


def test_bench_options_apply_to_ours_only(tiny_pretrained):
    from gligen.bench.train_step import StepOptions

    module = make_module(tiny_pretrained)
    grounding = module.grounding_names
    options = StepOptions("bf16", channels_last=True, compile=True)
    set_variant(module, "ours", options)
    assert module.ldm.unet is module.compiled_unet and module.ldm.unet is not module.eager_unet
    assert module.eager_unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # the compiled wrapper renames parameters; the grads still follow the grounding weights (by identity)
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in module.grounding_params} and len(trainable) == len(grounding)
    set_variant(module, "official", options)  # the official-style step is always eager, channels-first, fp32
    assert module.ldm.unet is module.eager_unet
    assert module.eager_unet.conv_in.weight.is_contiguous()
    assert all(p.requires_grad for p in module.eager_unet.parameters())
    with pytest.raises(ValueError, match="precision"):
        StepOptions("fp8")


def test_half_frozen_casts_only_frozen_weights_and_only_for_ours(tiny_pretrained):
    from gligen.bench.train_step import StepOptions

    module = make_module(tiny_pretrained)
    grounding = {id(p) for p in module.grounding_params}
    set_variant(module, "ours", StepOptions("bf16", half_frozen=True))
    assert {p.dtype for p in module.parameters() if id(p) not in grounding} == {torch.bfloat16}
    assert {p.dtype for p in module.grounding_params} == {torch.float32}
    set_variant(module, "official", StepOptions("bf16", half_frozen=True))  # the official step: fp32 throughout
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="half_frozen needs a half precision"):
        StepOptions("fp32", half_frozen=True)


def test_bench_train_half_frozen_memory_side_by_side(tmp_path, monkeypatch):
    """The memory row of a half_frozen run holds ours with fp32 frozen weights too, measured in the same run. The
    per-variant measurement is replaced here (test_bench_train_tiny_memory runs the real subprocesses): what is
    measured, with which options, and how the row is made of it."""
    from gligen.bench import train_step
    from gligen.bench.train_step import StepOptions

    calls = []

    def fake_memory(pretrained, batch_path, variant, options=None):
        calls.append((variant, options))
        peak = {(True, "ours"): 300.0, (False, "ours"): 500.0}[(options.half_frozen, variant)]
        return {"peak_mb": peak, "step_mb": peak / 10, "method": "fake"}

    monkeypatch.setattr(train_step, "cpu_memory", fake_memory)
    script = load_script()
    lines = []
    options = StepOptions("bf16", half_frozen=True)
    (row,) = script.run(["tiny"], repeats=1, device="cpu", out=None, peak_size=128, log=lines.append,
                        options=options, memory_official=False)
    assert calls == [("ours", options), ("ours", StepOptions("bf16", half_frozen=False))]
    assert "mem_official_mb" not in row  # not measured on request (18 GB at the sd size)
    assert row["ours_options"] == "bf16+half_frozen" and row["half_frozen_ours"] is True
    assert row["mem_ours_mb"] == 300.0 and row["mem_ours_fp32_frozen_mb"] == 500.0
    assert row["mem_ratio_half_over_fp32_frozen"] == 300.0 / 500.0
    assert "with fp32 frozen weights 500 MB" in "\n".join(lines)


@pytest.mark.parametrize("native", [True, False])
def test_bench_train_tiny_bf16_channels_last(native, monkeypatch):
    """"ours" under bf16 autocast and channels-last (tiny sizes: bf16 is emulated, and slow, on AVX2-only CPUs). With
    native bf16 the MFU is against the bf16 matmul peak; without it no bf16 peak, limit or MFU is reported, whatever
    this processor has (the detection is replaced here, so both branches run everywhere)."""
    import gligen.bench.train_step
    from gligen.bench.train_step import StepOptions

    monkeypatch.setattr(gligen.bench.train_step, "native_bf16", lambda device: native)
    script = load_script()
    lines = []
    (row,) = script.run(["tiny"], repeats=1, device="cpu", memory=False, out=None, log=lines.append,
                        options=StepOptions("bf16", channels_last=True), image_size=32, batch_size=3, peak_size=128)
    check_row(row, lines)
    assert row["ours_options"] == "bf16+channels_last" and row["precision_ours"] == "bf16"
    assert row["image_size"] == 32 and row["batch_size"] == 3 and row["latent_size"] == 16
    if native:
        assert row["matmul_peak_flops_ours"] > 0
        assert math.isclose(row["mfu_ours"] * row["matmul_peak_flops_ours"],
                            row["mfu_ours_vs_fp32_peak"] * row["matmul_peak_flops"], rel_tol=1e-6)
        assert "MFU ours" in "\n".join(lines)
    else:
        assert row["matmul_peak_flops_ours"] is None and row["mfu_ours"] is None and row["limit_ours_s"] is None
        assert "bf16 is emulated" in "\n".join(lines) and "MFU ours" not in "\n".join(lines)


def test_native_bf16_detection():
    from gligen.bench.machine import cpu_flags, native_bf16, processor_class

    info = "processor: 0\nflags\t\t: fpu sse avx2 fma avx512f avx512bw avx512_bf16 amx_tile\n"
    flags = cpu_flags(info)
    assert flags == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]
    assert native_bf16("cpu", flags, "AVX512", environ={})
    assert processor_class(flags, "AVX512", environ={}) == "avx512+bf16"
    # what this test runs under must not decide its outcome (CI on a processor capped to AVX2 sets these)
    assert processor_class(flags, "AVX512", environ={"ONEDNN_MAX_CPU_ISA": "AVX2"}) == "avx512"
    # the same processor capped to AVX2 (ATEN_CPU_CAPABILITY) or below the bf16 ISA in oneDNN: emulated
    assert not native_bf16("cpu", flags, "AVX2", environ={}) and processor_class(flags, "AVX2", {}) == "avx2"
    assert not native_bf16("cpu", flags, "AVX512", environ={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    avx2_only = cpu_flags("flags : fpu sse avx2 fma\n")
    assert not native_bf16("cpu", avx2_only, "AVX2", environ={}) and processor_class(avx2_only, "AVX2", {}) == "avx2"
    no_bf16 = ["avx2", "fma", "avx512f", "avx512_vnni"]
    assert not native_bf16("cpu", no_bf16, "AVX512", environ={}) and processor_class(no_bf16, "AVX512", {}) == "avx512"


def test_bench_data_writes_rates_against_training(tmp_path, capsys):
    from gligen.experiments import bench_data as script

    out = tmp_path / "data.csv"
    script.main(["--train_config", "null", "--toy-samples", "48", "--batch-size", "8", "--batches", "2",
                 "--workers", "0", "--train-samples-per-s", "10", "--out", str(out)])
    from gligen.evaluation.results import read_csv

    rows = read_csv(out)
    assert [r["path"] for r in rows] == ["image", "latent"]
    for row in rows:
        rate = float(row["samples_per_s"])
        assert rate > 0 and float(row["x_training"]) == pytest.approx(rate / 10)
        assert row["git_commit"] and row["workers"] == "0" and row["processor_class"]
    assert "x training" in capsys.readouterr().out


def test_bench_data_measures_the_training_configs_own_consumption_in_the_same_run(tiny_toy_world, tmp_path, capsys):
    """The ratio is the loader's rate over the train config's measured step rate (same batch, LDM, text width),
    per path and worker count; the image path reads the config's own shards."""
    from gligen.evaluation.results import read_csv
    from gligen.experiments import bench_data as script
    from tests.helpers import tiny_train_config

    config = tiny_train_config(tmp_path, tiny_toy_world)
    out = tmp_path / "data.csv"
    script.main(["--train_config", str(config), "--toy_samples", "16", "--batches", "2", "--train_steps", "1",
                 "--workers", "[0]", "--out", str(out)])
    rows = read_csv(out)
    assert [r["path"] for r in rows] == ["image", "latent"]
    for row in rows:
        consumed = float(row["train_samples_per_s"])
        assert consumed == pytest.approx(4 / float(row["train_step_s"]))  # the tiny config's batch of 4
        assert float(row["x_training"]) == pytest.approx(float(row["samples_per_s"]) / consumed)
        assert row["batch_size"] == "4" and row["text_width"] and row["config_workers"] == "True"
        assert row["train_config"].endswith("toy_box.yaml") and row["processor_class"] and row["train_threads"]
    assert rows[0]["train_step_s"] != rows[1]["train_step_s"]  # each path's own consumption (latents skip the VAE)
    assert "x training" in capsys.readouterr().out


def test_the_toy_bench_size_is_the_toy_ldm_that_is_trained_on():
    """One toy model: the benchmark measures the shipped toy LDM itself (what build copies and every toy GLIGEN
    trains on), and the shape its rows report is that LDM's."""
    import json

    from gligen.bench.train_step import toy_size
    from gligen.toy.shipped import shipped_ldm

    size = toy_size()
    if not (shipped_ldm() / "model_index.json").exists():
        pytest.skip("no shipped toy LDM in this checkout")
    assert size.pretrained == str(shipped_ldm())
    unet = json.loads((shipped_ldm() / "unet" / "config.json").read_text())
    vae = json.loads((shipped_ldm() / "vae" / "config.json").read_text())
    text = json.loads((shipped_ldm() / "text_encoder" / "config.json").read_text())
    assert list(size.pipeline.unet_channels) == unet["block_out_channels"]
    assert list(size.pipeline.vae_channels) == vae["block_out_channels"]
    assert size.pipeline.text_width == text["hidden_size"] == unet["cross_attention_dim"]
    from gligen.experiments.config import toy_train_config
    from gligen.training.rundir import load_config

    trained = load_config([ROOT / p for p in toy_train_config("box")])
    assert size.latent_size == unet["sample_size"] and size.batch_size == trained["data"]["init_args"]["batch_size"]
