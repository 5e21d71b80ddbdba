"""The prior's training loop in-process (LocalContext, CPU): learning, determinism, bit-exact resume."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from prior_codes import write_codes

from nextscale.config import ConfigError, load_config
from nextscale.prior.config import PriorTrainConfig
from nextscale.prior.engine import active_scales, train_prior
from nextscale.prior.loader import load_prior
from nextscale.runtime import LocalContext
from nextscale.tokenize.loader import save_tokenizer
from nextscale.tokenize.vqvae import build_vqvae

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codes(tmp_path_factory) -> str:
    """32 random samples (2 views each) of the golden_tiny tokenizer (V=64, L=30), 10 classes."""
    root = tmp_path_factory.mktemp("codes")
    torch.manual_seed(0)
    tok = str(root / "tokenizer.pt")
    save_tokenizer(build_vqvae("golden_tiny"), tok)
    return write_codes(str(root / "codes"), tok, num_samples=32, views=2, seed=0)


def _cfg(codes: str, out, *extra: str) -> PriorTrainConfig:
    return load_config(PriorTrainConfig, None, [
        f"data.url={codes}", "data.batch_size=8", "model.preset=golden_tiny", "steps=6", "log_every=1",
        "ckpt_every=3", f"output={out}", "workers.count=0", *extra])


def _rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(out) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out, "prior.pt"), weights_only=True)["state_dict"]


class CrashAfter(LocalContext):
    """Dies right after persisting the checkpoint of ``step`` (a killed process, in-process)."""

    def __init__(self, output: str, step: int):
        super().__init__(output)
        self.crash_step = step

    def report(self, metrics, checkpoint_dir=None):
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is not None and metrics["step"] == self.crash_step:
            raise KeyboardInterrupt("simulated crash")


def test_tiny_model_overfits_a_tiny_dataset(tmp_path):
    torch.manual_seed(0)
    save_tokenizer(build_vqvae("golden_tiny"), str(tmp_path / "tokenizer.pt"))
    one_batch = write_codes(str(tmp_path / "codes"), str(tmp_path / "tokenizer.pt"), num_samples=8, views=1, seed=0)
    cfg = _cfg(one_batch, tmp_path / "out", "steps=60", "log_every=10", "ckpt_every=1000", "optim.lr=1e-2",
               "optim.warmup_steps=5", "optim.schedule=const", "optim.weight_decay=0",
               "model.overrides.cond_drop_rate=0")
    summary = train_prior(cfg, LocalContext(cfg.output))
    rows = _rows(tmp_path / "out")
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert rows[0]["loss"] > 3.0  # ~ln(64) = 4.16 at the start
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    assert rows[-1]["acc_last"] > rows[0]["acc_last"]
    assert summary["steps"] == summary["steps_trained"] == 60
    model, _ = load_prior(summary["prior_url"])
    assert model.cfg.vocab_size == 64 and model.cfg.patch_nums == (1, 2, 3, 4)  # taken from the tokenizer


def test_loss_curve_is_reproducible_for_a_fixed_seed(codes, tmp_path):
    for run in ("a", "b"):
        cfg = _cfg(codes, tmp_path / run, "optim.lr=1e-3")
        train_prior(cfg, LocalContext(cfg.output))
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 6
    assert len({r["loss"] for r in a}) > 1
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # another seed gives another curve
    cfg = _cfg(codes, tmp_path / "c", "optim.lr=1e-3", "seed=1")
    train_prior(cfg, LocalContext(cfg.output))
    assert [r["loss"] for r in _rows(tmp_path / "c")] != [r["loss"] for r in a]


def test_resume_gives_the_same_next_losses_bit_for_bit(codes, tmp_path, caplog):
    # 12 steps over 4 batches per epoch: crosses epochs, checkpoints at 5 and 10
    extra = ("steps=12", "ckpt_every=5", "optim.lr=1e-3", "optim.warmup_steps=3",
             "model.overrides.drop_path_rate=0.1")  # condition dropout + drop path: the RNG must resume too
    cfg = _cfg(codes, tmp_path / "ref", *extra)
    train_prior(cfg, LocalContext(cfg.output))

    cfg = _cfg(codes, tmp_path / "cut", *extra)
    with pytest.raises(KeyboardInterrupt):
        train_prior(cfg, CrashAfter(cfg.output, 10))
    assert [r["step"] for r in _rows(tmp_path / "cut")] == list(range(1, 11))
    # the latest checkpoint is damaged (a truncated upload): resume from the older one of step 5
    latest = tmp_path / "cut" / "checkpoints" / "step-00000010" / "state.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    summary = train_prior(cfg, LocalContext(cfg.output))
    assert (summary["steps"], summary["steps_trained"]) == (12, 7)
    assert "skipping checkpoint" in caplog.text and "step-00000010" in caplog.text and "truncated" in caplog.text

    ref, cut = _rows(tmp_path / "ref"), _rows(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 13))
    for key in ("loss", "acc_first", "acc_last", "grad_norm", "lr", "wd"):
        assert [r[key] for r in cut] == [r[key] for r in ref], key
    wr, wc = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert all(torch.equal(wr[k], wc[k]) for k in wr)

    # a finished run resumes at its end and trains nothing
    again = train_prior(cfg, LocalContext(cfg.output))
    assert (again["steps"], again["steps_trained"]) == (12, 0)
    assert all(torch.equal(wr[k], v) for k, v in _weights(tmp_path / "cut").items())


def test_checkpoint_is_complete(codes, tmp_path):
    from nextscale import checkpoint

    cfg = _cfg(codes, tmp_path, "steps=3")
    train_prior(cfg, LocalContext(cfg.output))
    where, folder = next(LocalContext(cfg.output).checkpoints())
    assert where.endswith("step-00000003")
    checkpoint.verify(folder)
    state = checkpoint.load(folder)
    assert state["step"] == 3 and state["world_size"] == 1 and state["format"] == checkpoint.FORMAT
    assert set(state) >= {"model", "optimizer", "scaler", "batches", "rng", "history", "config", "var_config",
                          "tokenizer"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    params = dict(load_prior(os.path.join(tmp_path, "prior.pt"))[0].named_parameters())
    assert len(state["optimizer"]["state"]) == len(params) and set(params) < set(state["model"])
    assert state["config"]["output"] == str(tmp_path) and state["rng"][0]["torch"].dtype == torch.uint8
    assert state["batches"][0]["epoch"] == 0 and state["batches"][0]["loader"]


def test_epochs_set_the_step_count_from_the_manifest(codes, tmp_path):
    cfg = _cfg(codes, tmp_path, "steps=0", "epochs=1.5", "log_every=100")
    assert train_prior(cfg, LocalContext(cfg.output))["steps"] == 6  # 32 samples / 8 = 4 steps per epoch


def test_progressive_training_grows_the_active_scales(codes, tmp_path):
    assert [active_scales(s, 100, 4, 0.5, 2) for s in (0, 16, 17, 33, 34, 50, 99)] == [2, 2, 3, 3, 4, 4, 4]
    assert active_scales(0, 100, 4, 0.0, 2) == 4
    cfg = _cfg(codes, tmp_path, "steps=4", "progressive.fraction=0.5", "progressive.start_scales=3")
    train_prior(cfg, LocalContext(cfg.output))
    assert [r["scales"] for r in _rows(tmp_path)] == [3, 4, 4, 4]  # 2 growth steps: 1 each with 3 and 4


def test_config_errors_name_the_key_and_the_fix(codes, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of steps"):
        _cfg(codes, tmp_path, "epochs=2")
    with pytest.raises(ConfigError, match="divisible by workers.count=3"):
        _cfg(codes, tmp_path, "workers.count=3")
    with pytest.raises(ConfigError, match="model.preset='d17' is unknown"):
        _cfg(codes, tmp_path, "model.preset=d17")
    with pytest.raises(ConfigError, match="unknown config key 'model.overrides.width'"):
        _cfg(codes, tmp_path, "model.overrides.width=3")
    with pytest.raises(ConfigError, match="needs workers.count >= 2"):
        _cfg(codes, tmp_path, "workers.strategy=fsdp")
    cfg = _cfg(codes, tmp_path, "model.overrides.vocab_size=4096")
    with pytest.raises(ValueError, match="vocab_size=4096 disagrees with the tokenizer's 64"):
        train_prior(cfg, LocalContext(cfg.output))
    cfg = _cfg(codes, tmp_path, "model.overrides.num_classes=5")
    with pytest.raises(ValueError, match="10 classes but the model has num_classes=5"):
        train_prior(cfg, LocalContext(cfg.output))


def test_demo_configs_load():
    for name in ("prior_demo", "prior_debug", "prior_d16", "prior_d20", "prior_d24", "prior_d30", "prior_mvar_demo",
                 "prior_mvar_d16"):
        cfg = load_config(PriorTrainConfig, name)
        assert cfg.output
    d16 = load_config(PriorTrainConfig, "prior_d16")
    assert (d16.data.batch_size, d16.epochs, d16.optim.final_lr_ratio) == (768, 200, 0.1)
    assert d16.optim.peak_lr(768) == pytest.approx(3e-4) and d16.model.preset == "d16" and d16.workers.device == "cuda"
    assert (d16.workers.count, d16.data.loader_processes) == (8, 4)
    d30 = load_config(PriorTrainConfig, "prior_d30")
    assert (d30.optim.base_lr, d30.optim.wd_end, d30.data.batch_size) == (8e-5, 0.08, 1024)
    # M-VAR-d16: VAR-d16's recipe, attn_l2_norm off (official README)
    mvar = load_config(PriorTrainConfig, "prior_mvar_d16")
    assert dataclasses.replace(mvar, model=d16.model, output=d16.output) == d16
    assert mvar.model.var_config().arch == "mvar" and not mvar.model.var_config().attn_l2_norm


def test_old_worker_keys_still_load_with_a_deprecation_warning(caplog):
    cfg = load_config(PriorTrainConfig, None, ["steps=1", "num_workers=4", "max_failures=0", "use_gpu=true",
                                               "data.num_workers=2"])
    assert (cfg.workers.count, cfg.workers.max_failures, cfg.workers.device, cfg.data.loader_processes) == (4, 0, "cuda", 2)
    assert "'num_workers' is deprecated, use 'workers.count'" in caplog.text
    assert "'use_gpu' is deprecated, use 'workers.device' (use_gpu=true is device=cuda" in caplog.text
    assert "'data.num_workers' is deprecated, use 'data.loader_processes'" in caplog.text
    with pytest.raises(ConfigError, match="'num_workers' and 'workers.count' are both set"):
        load_config(PriorTrainConfig, None, ["steps=1", "num_workers=4", "workers.count=2"])


def test_run_prior_in_process_on_object_storage(s3_bucket, tmp_path):
    """Codes, tokenizer, checkpoints and outputs all on S3 (moto server); a rerun resumes and trains nothing."""
    from nextscale import storage
    from nextscale.pipelines.train import run_prior

    torch.manual_seed(0)
    save_tokenizer(build_vqvae("golden_tiny"), f"{s3_bucket}/tokenizer.pt")
    codes_url = write_codes(f"{s3_bucket}/codes", f"{s3_bucket}/tokenizer.pt", num_samples=16, views=1, seed=0)
    cfg = _cfg(codes_url, f"{s3_bucket}/prior", "steps=4", "ckpt_every=2")
    first = run_prior(cfg)
    assert (first["steps"], first["steps_trained"]) == (4, 4)
    assert storage.listdir(f"{s3_bucket}/prior/checkpoints") == ["step-00000002", "step-00000004"]
    assert load_prior(f"{s3_bucket}/prior/prior.pt")[0].cfg.vocab_size == 64
    rows = [json.loads(line) for line in storage.read_text(f"{s3_bucket}/prior/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    again = run_prior(cfg)
    assert (again["steps"], again["steps_trained"]) == (4, 0)


def test_mvar_trains_resumes_bit_for_bit_and_samples(codes, tmp_path):
    from nextscale.prior.mvar import MVAR
    from nextscale.prior.sample import sample_codes
    from nextscale.tokenize.loader import load_tokenizer

    extra = ("model.preset=mvar_golden_tiny", "steps=4", "ckpt_every=2", "optim.lr=3e-3", "optim.warmup_steps=2",
             "model.overrides.drop_path_rate=0.1")  # condition dropout + drop path: the RNG must resume too
    cfg = _cfg(codes, tmp_path / "ref", *extra)
    train_prior(cfg, LocalContext(cfg.output))
    cfg = _cfg(codes, tmp_path / "cut", *extra)
    with pytest.raises(KeyboardInterrupt):
        train_prior(cfg, CrashAfter(cfg.output, 2))
    assert train_prior(cfg, LocalContext(cfg.output))["steps_trained"] == 2
    ref, cut = _rows(tmp_path / "ref"), _rows(tmp_path / "cut")
    assert [r["loss"] for r in cut] == [r["loss"] for r in ref] and len({r["loss"] for r in ref}) == 4
    wr, wc = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert any(".mamba." in k for k in wr) and all(torch.equal(wr[k], wc[k]) for k in wr)

    mvar, _ = load_prior(os.path.join(tmp_path, "cut", "prior.pt"))
    assert isinstance(mvar, MVAR) and mvar.cfg.arch == "mvar"
    quantizer = load_tokenizer(os.path.join(os.path.dirname(codes), "tokenizer.pt"))[0].quantize
    draws = [sample_codes(mvar, quantizer, torch.tensor([2, 5]), generator=torch.Generator().manual_seed(1))
             for _ in range(2)]
    assert draws[0].shape == (2, 30) and torch.equal(draws[0], draws[1]) and int(draws[0].max()) < 64

    # the same output folder with a VAR preset: refused, naming both families
    cfg = _cfg(codes, tmp_path / "cut", "steps=6")
    with pytest.raises(ValueError, match=r"holds an M-VAR \(model.preset=mvar_golden_tiny\) but "
                                         r"model.preset=golden_tiny is a VAR"):
        train_prior(cfg, LocalContext(cfg.output))
