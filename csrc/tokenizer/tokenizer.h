// gptcore's byte-level BPE tokenizer: everything bindings.cpp needs in one include.
//   unicode.h      code-point classes, UTF-8, GPT-2's byte <-> character map
//   pretokenize.h  GPT-2's splitting pattern, by hand
//   bpe.h          the encoder/decoder (merges by rank, caches, threads)
//   trainer.h      learning a BPE from text
#pragma once

#include "tokenizer/bpe.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/trainer.h"
#include "tokenizer/unicode.h"
