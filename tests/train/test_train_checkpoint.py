"""Checkpoints: round trip, clear errors on missing/corrupt files, nothing half-written."""

import json

import pytest
import torch

from moekit.cli import main
from moekit.train import MoELM, load_checkpoint, preset, save_checkpoint
from moekit.train.checkpoint import CHECKPOINT_META, CHECKPOINT_TENSORS
from moekit.train.trainer import build_optimizer


def _model_and_opt(seed=0):
    p = preset("tiny")
    torch.manual_seed(seed)
    model = MoELM(p.lm)
    opt = build_optimizer(model, p.train)
    out = model(torch.randint(0, 256, (2, 8)))
    (out.logits_BSV.float().square().mean() + out.aux_loss).backward()
    opt.step()
    return model, opt


def test_round_trip_restores_model_and_optimizer(tmp_path):
    model, opt = _model_and_opt(0)
    save_checkpoint(tmp_path, model, opt, {"step": 3, "note": "x"})
    other, other_opt = _model_and_opt(1)
    meta = load_checkpoint(tmp_path, other, other_opt)
    assert meta["step"] == 3 and meta["note"] == "x"
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for idx in sa:
        for key in sa[idx]:
            assert torch.equal(torch.as_tensor(sa[idx][key]), torch.as_tensor(sb[idx][key]))
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint.json"):
        load_checkpoint(tmp_path)
    model, opt = _model_and_opt()
    save_checkpoint(tmp_path, model, opt, {"step": 1})
    (tmp_path / CHECKPOINT_TENSORS).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_checkpoint(tmp_path, model, opt)


@pytest.mark.parametrize("damage", ["flip_tensor_byte", "truncate_tensors", "bad_json", "wrong_format"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    model, opt = _model_and_opt()
    save_checkpoint(tmp_path, model, opt, {"step": 1})
    tensors, meta = tmp_path / CHECKPOINT_TENSORS, tmp_path / CHECKPOINT_META
    if damage == "flip_tensor_byte":
        raw = bytearray(tensors.read_bytes())
        raw[-5] ^= 0xFF
        tensors.write_bytes(bytes(raw))
    elif damage == "truncate_tensors":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "bad_json":
        meta.write_text(meta.read_text()[:50])
    else:
        meta.write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(ValueError, match="checkpoint"):
        load_checkpoint(tmp_path, model, opt)


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    model, opt = _model_and_opt()
    save_checkpoint(tmp_path, model, opt, {"step": 1})
    p = preset("cpu")
    with pytest.raises(ValueError, match="do not match"):
        load_checkpoint(tmp_path, MoELM(p.lm))


def test_failed_save_leaves_no_partial_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    model, opt = _model_and_opt()
    save_checkpoint(tmp_path, model, opt, {"step": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model, opt, {"step": 2})
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no temporary file left, the old checkpoint untouched
    assert load_checkpoint(tmp_path, model, opt)["step"] == 1


def test_cli_resume_without_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["train", "--preset", "tiny", "--resume", "--out-dir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("moekit train: error: checkpoint: no checkpoint.json")
    assert "\n" not in err
    assert not (tmp_path / "global-s0" / "metrics.json").exists()


def test_cli_bad_balance_list_for_compare(tmp_path, capsys):
    code = main(["compare", "--preset", "tiny", "--balance", "micro,local", "--out-dir", str(tmp_path)])
    assert code == 2
    assert "balance" in capsys.readouterr().err
