"""Every way a run can start wrong ends in one line naming the problem and the fix, exit 2, no
traceback: a missing or empty dataset, a batch larger than the dataset, a dataset without the
experiment's modalities, an unknown experiment, size or key, a corrupt or mismatched checkpoint on
--resume, unusable --init-from / --export sources."""

import os
import subprocess
import sys

import pytest
import torch

from olmoearth_fast import checkpoint as ckpt
from olmoearth_fast import experiments
from olmoearth_fast.data.demo import ensure_demo_dataset
from olmoearth_fast.train import main
from olmoearth_fast.trainer import Trainer, build_loader, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["data.num_workers=0", "data.global_batch_size=4", "data.rank_microbatch_size=2", "data.patch_sizes=[2,4]",
         "data.hw_p_list=[2,3]", "logging.plot=False", "logging.wandb=False", "trainer.log_every=1000"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors") / "demo_data"
    ensure_demo_dataset(root, num_samples=16, tile_size=32)
    return str(root)


def _argv(dataset, run, *extra):
    return ["exp14", "--demo", f"data.dataset={dataset}", f"checkpoint.dir={run}", *SMALL, *extra]


def _fails(capsys, argv) -> str:
    """The one stderr line of a launcher run that must stop with status 2."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["exp14"], r"no dataset: pass data.dataset=/path/to/h5_dataset .* or --demo"),
    (["exp14", "data.dataset=/nonexistent"], r"data.dataset=/nonexistent is not a directory.* or use --demo"),
    ([], r"name an experiment \(e.g. `exp14 data.dataset="),
    (["exp99"], r"unknown experiment 'exp99'; valid: exp1, exp2"),
    (["exp14", "model.size=huge"], r"unknown model size model.size='huge'; valid: nano, tiny"),
    (["exp14", "data.global_batch_sise=4"], r"unknown config key 'data.global_batch_sise'; closest: data.global_"),
    (["exp14", "data.global_batch_size=big"], r"bad value for data.global_batch_size: .*expected int"),
    (["exp14", "--data.global_batch_size"], r"is not of the form key=value"),
    (["exp14", "model.modalities=['sentinel3']"], r"unknown modality 'sentinel3'; valid modalities"),
    (["exp14", "trainer.precision=fp8"], r"trainer.precision='fp8': use auto, bf16 or fp32"),
    (["exp14", "data.prefetch_factor=0"], r"data.prefetch_factor=0 >= 1 \(batches each worker makes ahead\)"),
    (["exp14", "trainer.grad_bucket_mb=-1"], r"trainer.grad_bucket_mb=-1.0 must be >= 0"),
    (["exp14", "eval.knn_dataset=/no/eurosat"], r"eval.knn_dataset=/no/eurosat: no such path"),
])
def test_config_errors(argv, expected, capsys):
    import re

    assert re.search(expected, _fails(capsys, argv))


def test_the_two_first_commands_in_a_fresh_process(tmp_path):
    """The issue's commands, as a user types them: one line on stderr, nothing on stdout, exit 2."""
    for extra in ([], ["data.dataset=/nonexistent"]):
        proc = subprocess.run([sys.executable, "-m", "olmoearth_fast.train", "exp14", *extra], cwd=tmp_path,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        assert proc.returncode == 2 and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr


def test_dataset_without_samples(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = _fails(capsys, _argv(tmp_path / "empty", tmp_path / "run"))
    assert "no samples in" in line and "sample_*.h5" in line


def test_batch_larger_than_the_dataset(dataset, tmp_path, capsys):
    line = _fails(capsys, _argv(dataset, tmp_path / "run", "data.global_batch_size=32"))
    assert "has 16 samples, fewer than one global batch of 32: lower data.global_batch_size (to at most 16" in line


def test_dataset_without_the_experiments_modalities(tmp_path, capsys):
    only_s2 = tmp_path / "only_s2"
    ensure_demo_dataset(only_s2, num_samples=8, tile_size=16, modalities=("sentinel2_l2a",))
    line = _fails(capsys, _argv(only_s2, tmp_path / "run"))
    assert "has no sample with ['sentinel1'" in line and "set model.modalities=['sentinel2_l2a']" in line


def _save_first_checkpoint(dataset, run, name="exp14") -> str:
    cfg = experiments.resolve(name, [f"data.dataset={dataset}", f"checkpoint.dir={run}", *SMALL], demo_run=True)
    model = build_model(cfg, torch.device("cpu"))
    trainer = Trainer(cfg, build_loader(cfg, 0, 1, str(run)), model, torch.device("cpu"), str(run),
                      log=lambda *a: None)
    trainer.save()
    return ckpt.checkpoints(str(run))[-1][1]


def test_resume_from_a_corrupt_checkpoint(dataset, tmp_path, capsys):
    path = _save_first_checkpoint(dataset, tmp_path / "run")
    with open(path, "r+b") as f:  # a checkpoint cut short (disk full, copied while written)
        f.truncate(os.path.getsize(path) // 2)
    line = _fails(capsys, _argv(dataset, tmp_path / "run", "--resume"))
    assert f"--resume: {path} cannot be read" in line and "corrupt or truncated" in line


def test_resume_from_another_setup(dataset, tmp_path, capsys):
    path = _save_first_checkpoint(dataset, tmp_path / "run")
    line = _fails(capsys, _argv(dataset, tmp_path / "run", "--resume", "model.size=tiny",
                                "data.global_batch_size=8"))
    assert f"{path} was written by another setup (model.size='nano', data.global_batch_size=4)" in line
    assert "this run has model.size='tiny', data.global_batch_size=8" in line
    state = torch.load(path, weights_only=False)  # same settings, other weights (another version)
    state["model"].pop("decoder.mask_token")
    torch.save(state, path)
    line = _fails(capsys, _argv(dataset, tmp_path / "run", "--resume"))
    assert "another setup (model weights=" in line and "decoder.mask_token" in line
    torch.save({"weights": 1}, path)
    assert "is not an olmoearth_fast training checkpoint" in _fails(capsys, _argv(dataset, tmp_path / "run",
                                                                                    "--resume"))


def test_resume_continues_a_run(dataset, tmp_path, capsys):
    main(_argv(dataset, tmp_path / "run", "trainer.max_steps=1"))
    main(_argv(dataset, tmp_path / "run", "trainer.max_steps=2", "--resume"))
    out = capsys.readouterr().out
    assert "resumed from step 1" in out and ckpt.checkpoints(str(tmp_path / "run"))[-1][0] == 2


def test_unusable_weight_sources(dataset, tmp_path, capsys):
    line = _fails(capsys, _argv(dataset, tmp_path / "run", "--init-from", str(tmp_path / "nothing")))
    assert "nothing: no such file or directory; expected a reference checkpoint directory" in line
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    assert "junk.pth cannot be read as a state_dict" in _fails(
        capsys, _argv(dataset, tmp_path / "run", "--init-from", str(tmp_path / "junk.pth")))
    line = _fails(capsys, _argv(dataset, tmp_path / "run", "--export", str(tmp_path / "out")))
    assert "no checkpoint (step_*.pt) in" in line
    _save_first_checkpoint(dataset, tmp_path / "exp9", "exp9")
    line = _fails(capsys, ["exp9", "--demo", f"checkpoint.dir={tmp_path / 'exp9'}", *SMALL, "--export",
                           str(tmp_path / "out")])
    assert "bandset-merge models (exps 9, 10, 12) cannot be exported" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(dataset, tmp_path, capsys):
    line = _fails(capsys, _argv(dataset, tmp_path / "run", "trainer.device=cuda"))
    assert "trainer.device=cuda but torch sees no CUDA device" in line


def test_an_existing_run_is_not_overwritten(dataset, tmp_path, capsys):
    argv = ["exp14", f"data.dataset={dataset}", f"checkpoint.dir={tmp_path / 'run'}", "model.size=nano",
            "trainer.max_steps=1", *SMALL]
    main(argv)
    before = ckpt.checkpoints(str(tmp_path / "run"))
    line = _fails(capsys, argv)
    assert "already holds a run (checkpoint of step 1)" in line and "--resume" in line
    assert ckpt.checkpoints(str(tmp_path / "run")) == before  # untouched
    main([*argv, "checkpoint.overwrite=true"])  # asked for: starts again there
    main([*argv, "--resume", f"checkpoint.dir={tmp_path / 'fresh'}"])  # --resume without a checkpoint: a start
    assert "no checkpoint in" in capsys.readouterr().out
