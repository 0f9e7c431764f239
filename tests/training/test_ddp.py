"""Real 2-process CPU DDP runs (gloo): the training stream keeps ranks in step, and grounding AP in validation
gathers every rank's detections.

Each test writes a script into its tmp dir and runs it in a subprocess (with a timeout, so a hang fails the
test instead of blocking it). Lightning's "ddp" strategy then starts the second rank by re-running that script,
so pytest itself is never forked. Every rank writes what it saw to JSON files, which the test reads back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from gligen.data.examples import make_sample
from gligen.data.shards import write_shards
from tests.helpers import ROOT

TIMEOUT_S = 120  # generous on 2 shared cores; a DDP hang must fail rather than stall the suite

COMMON = '''
import json, os, sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

OUT = Path(sys.argv[1])
torch.set_num_threads(1)


def trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(OUT), **kw)
'''

DATA_SCRIPT = COMMON + '''
from gligen.data.datamodule import GroundingDataModule

# several training streams in one DDP job (each job costs two imports of torch): the first Trainer starts rank 1,
# the next ones find LOCAL_RANK set and the process group up, and reuse both
RUNS = json.loads(sys.argv[2])  # [{name, spec, resampled, num_workers, batch, batches, epochs}]


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append({"rank": self.global_rank, "epoch": self.current_epoch, "step": self.global_step,
                          "batch_idx": batch_idx, "keys": list(batch["keys"]), "members": sorted(batch),
                          "shape": list(batch["pixel_values"].shape)})
        return (self.weight * batch["boxes"].sum()).sum()  # DDP all-reduces this gradient: ranks must keep step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


seen, rank = {}, 0
for run in RUNS:
    L.seed_everything(0)
    dm = GroundingDataModule(train_shards={"grounding": run["spec"]}, resolution=16, batch_size=run["batch"],
                             num_workers=run["num_workers"], batches_per_epoch=run["batches"],
                             resampled=run["resampled"], shuffle_buffer=1, random_flip=False)
    t, module = trainer(max_epochs=run["epochs"]), Recorder()
    t.fit(module, datamodule=dm)
    seen[run["name"]], rank = module.seen, t.global_rank
(OUT / f"train-rank{rank}.json").write_text(json.dumps(seen))
'''

EVAL_SCRIPT = COMMON + '''
import gligen.training.callbacks as callbacks
from gligen.training.callbacks import GroundingEvaluation
from gligen.module import GLIGENModule
from tests.helpers import RandomBoxDataset, collate

PRETRAINED, RIGHT_RANK = sys.argv[2], int(sys.argv[3])  # the rank whose layouts the oracle detects right


class KeyedBoxes(RandomBoxDataset):
    """RandomBoxDataset with a distinct key per sample (its own keys all read "sample-0")."""

    def __getitem__(self, index):
        return {**super().__getitem__(index), "keys": f"val-{index}"}


class Data(L.LightningDataModule):
    def val_dataloader(self):  # Lightning adds the DistributedSampler: 3 samples per rank
        return torch.utils.data.DataLoader(KeyedBoxes(6), batch_size=2, collate_fn=collate)


state = {"keys": []}
real_generate = callbacks.generate


def generate(ldm, layouts, *args, **kwargs):
    state["layouts"] = layouts  # the oracle detector answers for exactly these layouts
    state["keys"] += [lay["key"] for lay in layouts]
    return real_generate(ldm, layouts, *args, **kwargs)


def oracle(images):
    out = []
    for layout in state["layouts"]:
        right = t.global_rank == RIGHT_RANK
        shift = 0.0 if right else 0.45  # shifted right by 0.45: no IoU >= 0.5 with any target
        out.append([{"box": [o["box"][0] + shift, o["box"][1], min(1.0, o["box"][2] + shift), o["box"][3]],
                     "label": o["phrase"], "score": 0.9} for o in layout["objects"]])
    return out


callbacks.generate = generate  # what GroundingEvaluation calls
L.seed_everything(0)
callback = GroundingEvaluation(detector=oracle, steps=2, guidance=1.0)
t = trainer(max_steps=1, callbacks=[callback])
module = GLIGENModule(PRETRAINED, warmup_steps=0)
t.validate(module, Data())
result = {"rank": t.global_rank, "world_size": t.world_size, "keys": state["keys"],
          "metrics": {k: float(v) for k, v in t.callback_metrics.items()}}
(OUT / f"val-rank{t.global_rank}.json").write_text(json.dumps(result))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, name: str, script: str, *args) -> list[dict]:
    """Run `script` (a 2-rank DDP job) and return its per-rank JSON outputs, rank 0 first."""
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(script))
    out = tmp_path / f"{name}-out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "SLURM_JOB_ID", "SLURM_NTASKS"):
        env.pop(var, None)  # a parent launcher's variables would make Lightning join its job instead
    # own session: on a timeout the whole job (rank 0, the rank 1 it started, their loader workers) is killed
    proc = subprocess.Popen([sys.executable, str(path), str(out), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"DDP run {name} did not finish in {TIMEOUT_S} s (hang?)\n{stdout[-5000:]}\n{stderr[-8000:]}")
    assert proc.returncode == 0, f"DDP run {name} failed:\n{stdout[-5000:]}\n{stderr[-8000:]}"
    files = sorted(out.glob("*-rank*.json"))
    assert [f.name.rsplit("rank", 1)[1] for f in files] == ["0.json", "1.json"], (files, stderr[-5000:])
    return [json.loads(f.read_text()) for f in files]


def _write(root: Path, name: str, keys: list[str]) -> str:
    samples = (make_sample(k, width=16, height=16, seed=i, boxes=[(0.1, 0.1, 0.6, 0.7)]) for i, k in enumerate(keys))
    write_shards(samples, root / name, prefix=name, max_samples=len(keys), progress=False)
    return str(root / name)


@pytest.mark.slow
def test_ddp_training_stream_uneven_shards_resampled_and_exactly_once(tmp_path):
    # resampled=True on uneven shards (7, 2, 1 samples): both ranks run the same number of batches, no hang
    sizes = {"a": 7, "b": 2, "c": 1}
    resampled_spec = "::".join(_write(tmp_path, n, [f"{n}{i:02d}" for i in range(k)]) for n, k in sizes.items())
    resampled_keys = {f"{n}{i:02d}" for n, k in sizes.items() for i in range(k)}
    batches, epochs, batch = 3, 2, 2
    # resampled=False, one shard group per rank (shard i goes to rank i % 2; uneven shards 3, 3, 1, 1 give each
    # rank 4 samples) and batches_per_epoch * batch_size = 4: one epoch reads every sample exactly once.
    # Exactly-once needs shuffle_buffer=1: a larger buffer reads ahead into the next pass of the cycled shards.
    root = tmp_path / "exact"
    exact_sizes = {"s0": 3, "s1": 3, "s2": 1, "s3": 1}
    exact_spec = "::".join(_write(root, n, [f"{n}k{i}" for i in range(k)]) for n, k in exact_sizes.items())
    runs = [{"name": "resampled", "spec": resampled_spec, "resampled": True, "num_workers": 2, "batch": batch,
             "batches": batches, "epochs": epochs},
            {"name": "exactly_once", "spec": exact_spec, "resampled": False, "num_workers": 1, "batch": 2,
             "batches": 2, "epochs": 1}]
    ranks = _run(tmp_path, "streams", DATA_SCRIPT, json.dumps(runs))

    resampled = [r["resampled"] for r in ranks]
    for rank, seen in enumerate(resampled):
        assert {s["rank"] for s in seen} == {rank}
        assert len(seen) == batches * epochs  # the same fixed count on each rank, whatever the shard sizes
        assert [s["step"] for s in seen] == list(range(batches * epochs))
        assert Counter(s["epoch"] for s in seen) == {e: batches for e in range(epochs)}
        for s in seen:
            assert s["shape"] == [batch, 3, 16, 16] and set(s["keys"]) <= resampled_keys
            assert "_skips" not in s["members"] and {"boxes", "masks", "phrases", "keys"} <= set(s["members"])
    assert [s["keys"] for s in resampled[0]] != [s["keys"] for s in resampled[1]]  # each rank draws its own stream

    exact = [r["exactly_once"] for r in ranks]
    assert [len(seen) for seen in exact] == [2, 2] and [{s["rank"] for s in seen} for seen in exact] == [{0}, {1}]
    per_rank = [Counter(k for s in seen for k in s["keys"]) for seen in exact]
    assert {k[:2] for k in per_rank[0]} == {"s0", "s2"} and {k[:2] for k in per_rank[1]} == {"s1", "s3"}
    seen = per_rank[0] + per_rank[1]
    assert set(seen) == {f"{n}k{i}" for n, k in exact_sizes.items() for i in range(k)} and set(seen.values()) == {1}


@pytest.mark.slow
def test_ddp_grounding_evaluation_gathers_all_ranks(tiny_pretrained, tmp_path):
    from gligen.evaluation.generate import layouts_from_batch
    from gligen.metrics.grounding import grounding_ap
    from tests.helpers import RandomBoxDataset, collate

    # an oracle right only on rank 0's share (one DDP job: each costs two imports of torch + diffusers): rank 0
    # alone would score AP50 = 1, the gathered set scores less, and both ranks report the gathered value
    ranks = _run(tmp_path, "half_oracle", EVAL_SCRIPT, tiny_pretrained, 0)
    for rank, result in enumerate(ranks):
        assert result["rank"] == rank and result["world_size"] == 2
    assert sorted(ranks[0]["keys"] + ranks[1]["keys"]) == [f"val-{i}" for i in range(6)]  # 3 + 3, disjoint
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 3
    share = ranks[0]["keys"]
    dataset = RandomBoxDataset(6)
    layouts = layouts_from_batch({**collate([dataset[i] for i in range(6)]), "keys": [f"val-{i}" for i in range(6)]})

    def detections(right):
        return [[{"box": [o["box"][0] + (0 if right(lay) else 0.45), o["box"][1],
                          min(1.0, o["box"][2] + (0 if right(lay) else 0.45)), o["box"][3]],
                  "label": o["phrase"], "score": 0.9} for o in lay["objects"]] for lay in layouts]

    whole = grounding_ap(detections(lambda lay: lay["key"] in share), layouts)["ap50"]
    rank0_only = [lay for lay in layouts if lay["key"] in share]
    assert grounding_ap([[{"box": o["box"], "label": o["phrase"], "score": 0.9} for o in lay["objects"]]
                         for lay in rank0_only], rank0_only)["ap50"] == pytest.approx(1.0)
    assert whole < 0.9
    for result in ranks:
        assert result["metrics"]["val/ap50_tau1"] == pytest.approx(whole, abs=1e-6)


SKIP_SCRIPT = COMMON + '''
from gligen.training.callbacks import SkipLogger
from gligen.data.datamodule import GroundingDataModule

SPEC = sys.argv[2]


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch["boxes"].sum()).sum()

    def on_train_end(self):  # after SkipLogger's on_train_end (callbacks first): its summed totals
        logger = next(c for c in self.trainer.callbacks if isinstance(c, SkipLogger))
        local = {k: v for k, v in self.trainer.datamodule.skip_summary().items()}
        (OUT / f"skips-rank{self.global_rank}.json").write_text(json.dumps({"totals": logger.totals,
                                                                           "local": local}))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


L.seed_everything(0)
dm = GroundingDataModule(train_shards={"grounding": SPEC}, resolution=16, batch_size=2, num_workers=0,
                         batches_per_epoch=2, resampled=False, shuffle_buffer=1, random_flip=False)
t = trainer(max_epochs=1, callbacks=[SkipLogger()])
t.fit(Recorder(), datamodule=dm)
'''


@pytest.mark.slow
@pytest.mark.chaos
def test_ddp_skip_counts_are_summed_over_ranks(tmp_path, chaos_outcome):
    """Each rank reads its own damaged shards (shard i -> rank i % 2, each read exactly once): every rank ends with
    the sum of both ranks' skips, by reason, while its own datamodule holds only its share."""
    from gligen.data.damage import DAMAGE, write_kind

    kinds = ["syntax_error_json", "pickle_member", "list_json", "deeply_nested_json"]  # shard i holds kinds[i]
    root = tmp_path / "shards"
    root.mkdir()
    # rank 0: 3 + 1 valid samples, rank 1: 3 + 1; the damaged one sits before the last valid one of its shard
    paths = [write_kind(str(root / f"s{i}.tar"), kind, size=16, lead=2 if i < 2 else 0, tail=1)
             for i, kind in enumerate(kinds)]
    ranks = _run(tmp_path, "skips", SKIP_SCRIPT, "::".join(paths))
    expected = Counter(DAMAGE[k].reason for k in kinds)
    own = [Counter(DAMAGE[k].reason for k in kinds[r::2]) for r in (0, 1)]
    for rank, result in enumerate(ranks):
        assert Counter({k.split("/", 1)[1]: v for k, v in result["local"].items()}) == own[rank]
        assert {k: v for k, v in result["totals"].items() if k.startswith("data_skips/")} == \
            {f"data_skips/train/{reason}": n for reason, n in expected.items()}
    chaos_outcome("data", "damaged samples on 2 DDP ranks", "counted skip",
                  "SkipLogger sums every rank's counts by reason")
