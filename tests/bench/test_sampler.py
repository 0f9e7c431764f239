import torch

from gligen.bench.sampler import bench_sampler
from gligen.module import GLIGENModule


def test_bench_sampler_times_both_and_gets_the_same_images(tiny_pretrained, tmp_path):
    torch.manual_seed(0)
    module = GLIGENModule(tiny_pretrained, gamma_init=0.5)
    for p in module.ldm.unet.position_net.parameters():
        p.data.normal_(std=0.1)
    saved = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(saved)  # keeps only the grounding layers, as Lightning's checkpoints do
    torch.save(saved, tmp_path / "m.ckpt")
    layout = {"prompt": "a red square", "phrases": ["red square"], "boxes": [[0.1, 0.1, 0.6, 0.6]]}
    row = bench_sampler(str(tmp_path / "m.ckpt"), layout, steps=3, guidance=3.0, tau=0.5, repeats=1)
    assert row["ours_s"] > 0 and row["diffusers_s"] > 0 and row["ratio"] > 0
    assert row["max_pixel_diff"] < 1e-4  # the same images, not just similar timings
