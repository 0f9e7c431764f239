"""experiments/bench_checkpoint.py measures the save of exactly what training writes: same weights, same AdamW
state, through the same CheckpointIO."""


from gligen.experiments import bench_checkpoint
from gligen.module import GLIGENModule


def test_the_benchmarked_checkpoint_holds_the_modules_trainable_weights_and_adam_moments(tiny_pretrained):
    module = GLIGENModule(tiny_pretrained)
    checkpoint = bench_checkpoint.gligen_checkpoint(module.ldm.unet)
    trainable = dict(module.trainable_named_parameters())
    assert set(checkpoint["state_dict"]) == set(trainable)
    assert all(checkpoint["state_dict"][k].shape == p.shape for k, p in trainable.items())
    states = checkpoint["optimizer_states"][0]["state"]
    assert len(states) == len(trainable)
    assert sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in states.values()) == \
        2 * sum(p.numel() for p in trainable.values())

