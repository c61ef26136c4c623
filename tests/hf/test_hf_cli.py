"""`moekit trace` and `moekit generate` on a tiny saved model with a word-level tokenizer."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import tiny_model  # noqa: E402

from moekit.cli import main  # noqa: E402
from moekit.trace import load_trace  # noqa: E402

WORDS = "the a expert token router layer model cache copy fast slow load balance gpu cpu text".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_olmoe")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="[UNK]")
    fast.save_pretrained(path)
    tiny_model("olmoe").save_pretrained(path)
    return path


def test_trace_cli_writes_a_trace(model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    rng = np.random.default_rng(0)
    text.write_text(" ".join(rng.choice(WORDS, size=50)))
    out = tmp_path / "trace.npz"
    rc = main(["trace", "--model", str(model_dir), "--text", str(text), "-o", str(out), "--seq-len", "8",
               "--batch-size", "2", "--dtype", "float32", "--device", "cpu", "--no-progress"])
    assert rc == 0 and "trace:" in capsys.readouterr().out
    trace = load_trace(out)
    assert trace.counts.shape == (3, 2, 6)  # 50 tokens -> 6 windows of 8 -> 3 steps of 2
    assert (trace.counts.sum(-1) == 2 * 8 * 2).all()


def test_generate_cli_prints_figures_and_writes_json(model_dir, tmp_path, capsys):
    out = tmp_path / "gen.json"
    rc = main(["generate", "--model", str(model_dir), "--prompt", "the expert router", "--prompt", "load balance",
               "--offload", "4", "--prefetch", "layer_output", "--lead-chunks", "1", "--policy", "lfu",
               "--max-new-tokens", "4", "--dtype", "float32", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "hit_rate" in printed and "pcie_utilization" in printed and "copy_busy_fraction" in printed
    assert "inflight_hit_rate" in printed and "prefetch_lead_s" in printed
    doc = json.loads(out.read_text())
    assert len(doc["texts"]) == 2 and doc["stats"]["tokens"] > 0 and doc["stats"]["num_slots"] == 4
    assert doc["stats"]["prefetch"] == "layer_output" and doc["stats"]["lead_chunks"] == 1


def test_generate_cli_staging_slots(model_dir, capsys):
    rc = main(["generate", "--model", str(model_dir), "--prompt", "the expert router", "--offload", "3",
               "--prefetch", "layer_output2", "--staging-slots", "2", "--max-new-tokens", "4", "--dtype", "float32",
               "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0 and "staging" in printed and "staged_hits" in printed
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--offload", "2", "--staging-slots", "-1",
                 "--device", "cpu", "--dtype", "float32"]) == 2
    assert "staging_slots" in capsys.readouterr().err


def test_cli_bad_input_is_one_line(model_dir, tmp_path, capsys):
    assert main(["trace", "--model", str(tmp_path), "--text", str(tmp_path / "none.txt"), "-o", "x.npz"]) == 2
    assert "moekit trace: error: --text" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("the a")
    assert main(["trace", "--model", str(tmp_path), "--text", str(tmp_path / "t.txt"), "-o", "x.npz"]) == 2
    assert "expected a local model folder" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--offload", "2",
                 "--policy", "fifo", "--device", "cpu", "--dtype", "float32"]) == 2
    assert "policy" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--offload", "lots",
                 "--device", "cpu", "--dtype", "float32"]) == 2
    assert "moekit generate: error: gpu_memory" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--offload", "2", "--lead-chunks", "0",
                 "--device", "cpu", "--dtype", "float32"]) == 2
    assert "lead_chunks" in capsys.readouterr().err


def test_generate_cli_graphs_need_cuda(model_dir, capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU test below runs instead")
    rc = main(["generate", "--model", str(model_dir), "--prompt", "a", "--offload", "2", "--graphs",
               "--device", "cpu", "--dtype", "float32"])
    assert rc == 2 and "CUDA" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_generate_cli_with_graphs_replays_and_matches_eager(model_dir, tmp_path, capsys):
    texts = {}
    for flag in ([], ["--graphs"]):
        out = tmp_path / f"gen{len(flag)}.json"
        rc = main(["generate", "--model", str(model_dir), "--prompt", "the expert router", "--prompt", "load balance",
                   "--offload", "4", "--max-new-tokens", "8", "--dtype", "float32", "--json", str(out), *flag])
        assert rc == 0
        texts[bool(flag)] = json.loads(out.read_text())
    assert texts[True]["texts"] == texts[False]["texts"]
    assert texts[True]["stats"]["graph_replays"] > 0 and "graph_replays" in capsys.readouterr().out
