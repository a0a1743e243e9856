"""Training loops: pre-training (pretrain.py), its checkpoints (checkpoint.py) and default corpus
(corpus.py)."""

from .checkpoint import (
                         CHECKPOINT_NAME,
                         is_native_v1_checkpoint,
                         load_checkpoint,
                         recorded_tokenizer,
                         save_checkpoint,
)
from .corpus import default_corpus_dir
from ._run import TrainingDiverged
from .pretrain import RUN_CONTROL_FIELDS, TrainConfig, evaluate, generate, train

__all__ = ["TrainConfig", "train", "evaluate", "generate", "save_checkpoint", "load_checkpoint",
           "is_native_v1_checkpoint", "recorded_tokenizer", "default_corpus_dir", "CHECKPOINT_NAME",
           "RUN_CONTROL_FIELDS", "TrainingDiverged"]
