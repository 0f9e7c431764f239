import lightning as L
import pytest

from gligen.module import GLIGENModule
from gligen.training.callbacks import GroundingEvaluation
from tests.helpers import RandomBoxDataModule


def oracle(shift: float):
    """A detector that 'finds' each layout object, shifted right by `shift` (checks the metric plumbing)."""
    state = {}

    def detect(images):
        layouts = state["layouts"]
        return [[{"box": [o["box"][0] + shift, o["box"][1], min(1.0, o["box"][2] + shift), o["box"][3]],
                  "label": o["phrase"], "score": 0.9} for o in layout["objects"]] for layout in layouts]

    return state, detect


@pytest.mark.parametrize("shift, expected", [(0.0, 1.0), (0.45, 0.0)])
def test_grounding_evaluation_logs_ap_over_the_validation_set(tiny_pretrained, tmp_path, monkeypatch, shift, expected):
    from gligen.training import callbacks

    state, detect = oracle(shift)
    real_generate = callbacks.generate

    def generate(ldm, layouts, *args, **kwargs):
        state["layouts"] = layouts  # the oracle detector answers for exactly these layouts
        return real_generate(ldm, layouts, *args, **kwargs)

    monkeypatch.setattr(callbacks, "generate", generate)
    callback = GroundingEvaluation(detector=detect, steps=2, guidance=1.0)
    module = GLIGENModule(tiny_pretrained, warmup_steps=0)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, callbacks=[callback], default_root_dir=tmp_path)
    trainer.validate(module, RandomBoxDataModule())
    assert trainer.callback_metrics["val/ap50_tau1"].item() == pytest.approx(expected)
