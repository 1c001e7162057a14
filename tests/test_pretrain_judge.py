"""The pretraining judge (issue 23, part 4): open_clip's own trainer (`open_clip_train.main.main`)
on a run's pruned shards for a fixed number of samples seen, then zero-shot and retrieval scores.

The pure pieces are checked against open_clip_train itself (its argument parser and its webdataset
loader's epoch arithmetic); one end-to-end test trains a few steps on the session run's pruned
shards, kills nothing but removes the last checkpoint (what a kill during the last epoch leaves),
resumes, and checks the resumed weights are the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from prune.evaluate import pretrain as P

# --- samples seen: our plan is open_clip_train's arithmetic ------------------------------------------

@pytest.mark.parametrize("samples_seen,batch,epochs,workers", [
    (5000, 50, 5, 0), (5000, 64, 5, 0), (1000, 100, 3, 1), (12345, 32, 4, 2), (400, 50, 2, 0), (7, 50, 1, 0),
])
def test_plan_matches_open_clip_train_loader(tmp_path, samples_seen, batch, epochs, workers):
    from open_clip_train.data import get_wds_dataset

    plan = P.samples_seen_plan(samples_seen, batch, epochs, workers)
    for i in range(max(1, workers)):  # it wants a shard per worker
        with tarfile.open(tmp_path / f"{i:05d}.tar", "w"):
            pass
    args = SimpleNamespace(train_data=P.shards_in(str(tmp_path)).pattern, dataset_resampled=False, train_num_samples=plan.train_num_samples,
                           train_data_upsampling_factors=None, seed=0, workers=workers, world_size=1,
                           batch_size=batch)
    info = get_wds_dataset(args, lambda im: im, is_train=True, epoch=0, tokenizer=lambda t: [t])
    assert info.dataloader.num_batches == plan.steps_per_epoch
    assert info.dataloader.num_samples * epochs == plan.samples_seen
    assert plan.steps * batch == plan.samples_seen >= samples_seen
    if samples_seen % (batch * epochs * max(1, workers)) == 0:
        assert plan.samples_seen == samples_seen  # exact when it divides


def test_train_argv_parses_as_open_clip_train_reads_it(tmp_path):
    from open_clip_train.params import parse_args

    plan = P.samples_seen_plan(5000, 50, 5)
    argv = P.train_argv("/d/{00000..00003}.tar", plan, str(tmp_path), "run", "sslprune-vit-tiny-x", seed=3, lr=2e-3)
    args = parse_args(argv)
    assert (args.dataset_type, args.train_num_samples, args.epochs, args.batch_size) == ("webdataset", 1000, 5, 50)
    assert (args.device, args.precision, args.workers, args.resume, args.report_to) == ("cpu", "fp32", 0, "latest", "")
    assert args.warmup == plan.steps // 10 and args.seed == 3 and args.lr == 2e-3
    assert args.delete_previous_checkpoint and not args.dataset_resampled
    assert (args.beta2, args.eps) == (0.98, 1e-6)  # "vit" in the model name: open_clip_train's ViT AdamW defaults
    assert parse_args(P.train_argv("x.tar", plan, "l", "n", "m", resampled=True, keep_checkpoints=True)).dataset_resampled


# --- shards, configs, checkpoints ------------------------------------------------------------------

def _tar(path, keys, members=("jpg", "txt", "json")):
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))


def test_shards_in_patterns_and_sizes(tmp_path):
    import braceexpand

    for stem in ("00000", "00001", "00002"):
        _tar(tmp_path / f"{stem}.tar", [f"{stem}000{i}" for i in range(3)])
    s = P.shards_in(str(tmp_path))
    assert s.pattern == f"{tmp_path}/{{00000..00002}}.tar" and s.samples is None and s.count == 3
    assert list(braceexpand.braceexpand(s.pattern)) == list(s.paths)
    assert P.count_trainable(s.paths) == 9
    (tmp_path / "sizes.json").write_text(json.dumps({f"{x}.tar": 3 for x in ("00000", "00001", "00002")}))
    assert P.shards_in(str(tmp_path)).samples == 9
    os.remove(tmp_path / "00001.tar")  # a gap: a comma list, and sizes.json still sums the ones there
    s = P.shards_in(str(tmp_path))
    assert s.pattern == f"{tmp_path}/{{00000,00002}}.tar" and s.samples == 6
    assert list(braceexpand.braceexpand(s.pattern)) == list(s.paths)
    _tar(tmp_path / "00003.tar", ["a", "b"], members=("jpg", "json"))  # no caption: not trainable
    assert P.count_trainable([str(tmp_path / "00003.tar")]) == 0


def test_model_config_registers_by_name(tmp_path):
    import open_clip

    cfg = P.tiny_clip_config()
    name = P.write_model_config(str(tmp_path), cfg)
    assert name == P.model_name_for(cfg) and "vit" in name and name != P.model_name_for(P.tiny_clip_config(patch_size=8))
    P.register_model_config(str(tmp_path))
    assert open_clip.get_model_config(name) == cfg
    with pytest.raises(ValueError):
        P.tiny_clip_config(vision_width=100)


def test_torn_checkpoints_are_dropped(tmp_path):
    from pipelines.pretrain_judge import checkpoint_epochs, drop_torn_checkpoints

    d = tmp_path / "logs" / "run" / "checkpoints"
    d.mkdir(parents=True)
    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(2)}, "optimizer": {}}, d / "epoch_1.pt")
    torch.save({"epoch": 2, "state_dict": {"w": torch.ones(2)}, "optimizer": {}}, d / "epoch_2.pt")
    data = (d / "epoch_2.pt").read_bytes()
    (d / "epoch_2.pt").write_bytes(data[: len(data) // 2])  # killed while torch.save wrote it
    assert drop_torn_checkpoints(str(tmp_path / "logs"), "run") == [str(d / "epoch_2.pt")]
    assert checkpoint_epochs(str(tmp_path / "logs"), "run") == [1]


def test_child_env_is_not_a_distributed_rank():
    env = P.child_env({"WORLD_SIZE": "8", "SLURM_NTASKS": "4", "RANK": "3", "PATH": "/bin", "OMP_NUM_THREADS": "16"}, 1)
    assert not {"WORLD_SIZE", "SLURM_NTASKS", "RANK"} & set(env)
    assert env["PATH"] == "/bin" and env["OMP_NUM_THREADS"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""


# --- scores ------------------------------------------------------------------------------------------

def test_class_scores():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 0, 0, 0, 2, 2])
    s = P.class_scores(pred, labels, 4, worst_k=2)
    assert s[P.ACCURACY] == pytest.approx(5 / 8)
    assert s[P.BALANCED_ACCURACY] == pytest.approx((1 + 0.5 + 0.5) / 3)  # class 3 absent: not averaged
    assert s[P.WORST_ACCURACY] == pytest.approx(0.5) and np.isnan(s["per_class"][3])


def test_zero_shot_averages_prompts():
    names = ["sandal", "ankle boot"]
    assert P.class_prompts("ankle boot", ("a photo of {a}", "{n}")) == ["a photo of an ankle boot", "ankle boot"]

    def encode(texts):  # class 0's prompts point along x, class 1's along y, one prompt off-axis each
        return np.array([[1.0, 0.0] if "sandal" in t else [0.0, 1.0] for t in texts]) + \
            np.array([[0.0, 0.3] if t.startswith("a photo") else [0.0, 0.0] for t in texts])

    w = P.zero_shot_weights(encode, names, ("a photo of {a}", "{n}"))
    assert w.shape == (2, 2) and np.allclose(np.linalg.norm(w, axis=1), 1)
    assert list(P.zero_shot_predict(np.array([[1.0, 0.1], [0.1, 1.0], [2.0, 0.0]]), w)) == [0, 1, 0]


def test_retrieval_recall():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(20, 8))
    r = P.retrieval_recall(img, img + 1e-3 * rng.normal(size=img.shape))
    assert r["image_to_text_R@1"] == r["text_to_image_R@1"] == 1.0
    txt = np.roll(img, 1, axis=0)  # every image's nearest text is another pair's
    r = P.retrieval_recall(img, txt, ks=(1, 5))
    assert r["mean_R@1"] == 0.0 and r["mean_R@5"] >= r["mean_R@1"]
    groups = P.caption_groups(["a", "b"] * 10)  # same text, same group: a text of the same caption counts
    assert list(groups[:4]) == [0, 1, 0, 1]
    r = P.retrieval_recall(img, np.roll(img, 2, axis=0), ks=(1,), groups=groups)
    assert r["image_to_text_R@1"] == 1.0
    # Copies of one caption are one candidate: with 2 distinct texts, R@2 is 1 whatever the features.
    r = P.retrieval_recall(img, rng.normal(size=img.shape), ks=(1, 2), groups=groups)
    assert r["image_to_text_R@2"] == 1.0 and r["image_to_text_R@1"] < 1.0


# --- end to end: open_clip_train on real pruned shards -----------------------------------------------

def test_open_clip_train_on_pruned_shards_resumes_and_scores(pipeline_run, tmp_path):
    from pipelines.pretrain_judge import JudgeSettings, fmnist_judge, read_checkpoint, train_on_shards
    from prune.demo.fashion_mnist import CLASS_NAMES

    pruned = os.path.join(pipeline_run["out"], "pruned")
    shards = P.shards_in(pruned)
    assert shards.samples and shards.samples >= 50  # the write stage's sizes.json
    # 400 samples seen in 2 epochs of 4 steps of 50, whatever the subset's size (here about 140:
    # open_clip_train reads it about 3 times); every epoch's checkpoint kept.
    settings = JudgeSettings(samples_seen=400, batch_size=50, epochs=2, keep_checkpoints=True, timeout_s=300,
                             model=P.tiny_clip_config(patch_size=8, vision_width=32, text_width=32, embed_dim=32))
    first = train_on_shards(pruned, str(tmp_path), settings)
    assert first.checkpoint.endswith("/logs/run/checkpoints/epoch_2.pt") and first.resumed_from_epoch == 0
    assert first.samples_seen == 400 and first.logged_samples == {0: 200, 1: 200}
    assert first.subset_samples == shards.samples and "--resume" in first.argv
    uninterrupted = read_checkpoint(first.checkpoint)["state_dict"]

    # What a kill during the last epoch leaves: its checkpoint is not there. The same call resumes
    # from epoch 1 and ends where the uninterrupted run did, bit for bit.
    os.remove(first.checkpoint)
    again = train_on_shards(pruned, str(tmp_path), settings)
    assert again.resumed_from_epoch == 1 and again.samples_seen == 400
    assert "resuming checkpoint" in open(os.path.join(tmp_path, "logs", "run", "out.log")).read()
    resumed = read_checkpoint(again.checkpoint)["state_dict"]
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)

    # The run directory is that training's: other settings there are refused, not resumed.
    with pytest.raises(ValueError, match="other settings"):
        train_on_shards(pruned, str(tmp_path), JudgeSettings(**{**settings.__dict__, "lr": 1e-3}))

    # A finished run is found, not trained again; then the scores.
    record = fmnist_judge(pruned, str(tmp_path), settings, n_test=200, n_pairs=100)
    assert record["train"]["seconds"] == 0.0 and record["train"]["samples_seen"] == 400
    zs, rt = record["metrics"]["zero_shot"], record["metrics"]["retrieval"]
    assert len(zs["per_class"]) == len(CLASS_NAMES) and record["metrics"]["n_test"] == 200
    for key in (P.ACCURACY, P.BALANCED_ACCURACY, P.WORST_ACCURACY):
        assert 0.0 <= zs[key] <= 1.0
    assert zs[P.WORST_ACCURACY] <= zs[P.BALANCED_ACCURACY]
    for way in ("image_to_text", "text_to_image", "mean"):
        assert 0.0 <= rt[f"{way}_R@1"] <= rt[f"{way}_R@5"] <= 1.0
    assert os.path.exists(os.path.join(tmp_path, "logs", "run", "judge.json"))


def test_a_subset_smaller_than_a_batch_is_refused_not_hung(tmp_path):
    """Without --dataset-resampled open_clip_train would repeat empty passes for ever (no full batch)."""
    from pipelines.pretrain_judge import JudgeSettings, train_on_shards
    from prune.demo.shards import write_demo_shards

    write_demo_shards(str(tmp_path / "shards"), count=30, shard_size=30)
    with pytest.raises(ValueError, match="fewer than a batch"):
        train_on_shards(str(tmp_path / "shards"), str(tmp_path / "work"), JudgeSettings(batch_size=50))
