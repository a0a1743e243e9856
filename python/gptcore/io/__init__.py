"""Checkpoints that travel: transformers' GPT-2/GPT-1 directories (gptcore's own format),
safetensors, llm.c's model, tokenizer and shard files, and conversion between them.

    safetensors.py   the safetensors format by hand, bfloat16 bits, CheckpointError
    hf.py            transformers' config.json + model.safetensors
    llmc.py          llm.c's model .bin
    vocab.py         llm.c's tokenizer .bin and GPT-2's vocab.json + merges.txt
    pretrained.py    save_pretrained / load_pretrained, any-format reading, convert
"""

from .llmc import (
                         LLMC_MODEL_MAGIC,
                         LLMC_SHARD_MAGIC,
                         LLMC_TOKENIZER_MAGIC,
                         read_llmc_model,
                         write_llmc_model,
)
from .pretrained import (
                         convert,
                         detect_format,
                         load_pretrained,
                         load_task_config,
                         load_tokenizer,
                         load_training_state,
                         load_weights,
                         read_weights,
                         save_pretrained,
                         write_weights,
)
from .safetensors import (
                         CheckpointError,
                         SafetensorsFile,
                         bf16_bits_to_float32,
                         float32_to_bf16_bits,
                         load_safetensors,
                         save_safetensors,
)
from .vocab import (
                         LlmcTokenizer,
                         read_gpt2_vocab,
                         read_llmc_tokenizer,
                         write_gpt2_vocab,
                         write_llmc_tokenizer,
)

__all__ = [
    "CheckpointError", "SafetensorsFile", "bf16_bits_to_float32", "float32_to_bf16_bits", "load_safetensors", "save_safetensors",
    "save_pretrained", "load_pretrained", "load_task_config", "load_weights", "load_training_state", "read_weights",
    "write_weights", "read_llmc_model", "write_llmc_model", "LlmcTokenizer", "read_llmc_tokenizer",
    "write_llmc_tokenizer", "read_gpt2_vocab", "write_gpt2_vocab", "load_tokenizer", "detect_format",
    "convert", "LLMC_MODEL_MAGIC", "LLMC_TOKENIZER_MAGIC", "LLMC_SHARD_MAGIC",
]
