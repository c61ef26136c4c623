"""A small MoE language model trained on an embedded multi-domain corpus.

Used by ``moekit train`` and ``moekit compare`` to show how the balance objective (none,
micro-batch, sequence, global-batch, loss-free) shapes what experts learn.
"""

from moekit.train.checkpoint import load_checkpoint, save_checkpoint
from moekit.train.compare import compare
from moekit.train.corpus import VOCAB_SIZE, Corpus, decode, encode, load_corpus
from moekit.train.evaluate import evaluate, routing_summary
from moekit.train.loader import LoaderConfig, MicroBatch, eval_batches, micro_batch
from moekit.train.model import LMConfig, LMOutput, MoELM
from moekit.train.plots import plot_compare, plot_run
from moekit.train.presets import BALANCE_ARMS, PRESETS, Preset, preset, with_balance
from moekit.train.trainer import TrainConfig, forward_backward, lr_at, train

__all__ = [
    "VOCAB_SIZE", "Corpus", "load_corpus", "encode", "decode",
    "LoaderConfig", "MicroBatch", "micro_batch", "eval_batches",
    "LMConfig", "LMOutput", "MoELM",
    "TrainConfig", "train", "forward_backward", "lr_at",
    "evaluate", "routing_summary",
    "save_checkpoint", "load_checkpoint",
    "Preset", "PRESETS", "BALANCE_ARMS", "preset", "with_balance",
    "compare", "plot_run", "plot_compare",
]
