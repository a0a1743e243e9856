"""Token data: llm.c-format shards (shards.py), preparing them from text (prepare.py), and the
seeded batch loaders that read them (loader.py)."""

from .loader import BatchLoader, eval_batches
from .prepare import ByteTokenizer, expand_text_files, get_tokenizer, prepare, read_text
from .shards import (
                     HEADER_BYTES,
                     HEADER_INTS,
                     META_NAME,
                     SHARD_MAGIC,
                     SHARD_VERSION,
                     TokenData,
                     load_meta,
                     read_llmc_header,
                     read_shard,
                     shard_paths,
                     write_shard,
)

__all__ = [
    "SHARD_MAGIC", "SHARD_VERSION", "HEADER_INTS", "HEADER_BYTES", "META_NAME", "write_shard",
    "read_shard", "read_llmc_header", "ByteTokenizer", "get_tokenizer", "prepare", "load_meta",
    "shard_paths", "TokenData", "BatchLoader", "eval_batches", "read_text", "expand_text_files",
]
