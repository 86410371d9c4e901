"""SentencePiece BPE tokenizer: trained on the corpus and saved beside the run, or loaded from a file.

Conventions: id 0 is ``<unk>``, id 1 is ``</s>`` (the document separator), ``"\n"`` is a single token, byte
fallback is on (no text is ever lost to ``<unk>``), and no normalisation is applied, so ``decode(encode(s)) == s``.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import sentencepiece as spm

from gptjax import storage

EOS_ID = 1


class TokenizerError(ValueError):
    """The tokenizer cannot be trained or loaded; the message says why."""


class Tokenizer:
    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise TokenizerError("the tokenizer has no </s> (eos) piece; gptjax separates documents with it")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], threads: int = 2) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_text(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text, as OpenAI's API shows tokens: its piece with the word-start mark as a space, a
        byte-fallback piece as ``bytes:\\xNN``."""
        out = []
        for i in ids:
            piece = self.sp.id_to_piece(int(i))
            out.append(f"bytes:\\x{piece[3:5].lower()}" if self.sp.is_byte(int(i)) else piece.replace("\u2581", " "))
        return out

    def piece_bytes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(bytes_V, word_start_V)``: the UTF-8 length of each token's text (a byte-fallback piece is one byte,
        control pieces none) and whether its piece begins with the word-start mark. sentencepiece adds that mark
        at the start of every encoded text (its dummy prefix) and decoding drops it there, so a word-start token
        right after ``</s>`` stands for one byte less (:func:`gptjax.evals.loss.target_bytes`)."""
        sp = self.sp
        n = sp.get_piece_size()
        size = np.array([0 if sp.is_control(i) or sp.is_unknown(i) else 1 if sp.is_byte(i)
                         else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")) for i in range(n)],
                        np.int64)
        start = np.array([sp.id_to_piece(i).startswith("\u2581") for i in range(n)], bool)
        return size, start

    def save(self, path: str | Path) -> None:
        storage.as_path(path).write_bytes(self.proto)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """A ``.model`` file: local, or an object in a bucket."""
        path = storage.as_path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer model {path} does not exist" + (" (it is a directory)"
                                                                             if path.is_dir() else ""))
        try:
            return cls(path.read_bytes())
        except RuntimeError:  # sentencepiece's parse failure: "INTERNAL: ... ParseFromArray", a traceback before
            raise TokenizerError(f"{path} is not a sentencepiece model (it does not parse as one); give the .model "
                                 "file gptjax-data train-tokenizer or gptjax-train wrote") from None

    @classmethod
    def train(cls, docs: Sequence[str], vocab_size: int, seed: int = 0,
              sample_chars: int = 20_000_000) -> "Tokenizer":
        """Train BPE on the paragraphs of ``docs`` (a seeded sample of at most ``sample_chars`` characters)."""
        paras = [p for d in docs for p in d.split("\n\n") if p.strip()]
        random.Random(seed).shuffle(paras)
        sample, total = [], 0
        for p in paras:
            if total >= sample_chars:
                break
            sample.append(p)
            total += len(p)
        n_chars = len(set("".join(sample)))
        # BPE needs room for every character plus the special pieces; say so rather than fail deep inside.
        if vocab_size < 259 + 3:
            raise TokenizerError(f"vocab_size={vocab_size} is too small for a byte-fallback tokenizer; use >= 262")
        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample), model_writer=out, vocab_size=vocab_size, model_type="bpe",
                character_coverage=1.0, byte_fallback=True, unk_id=0, eos_id=EOS_ID, bos_id=-1, pad_id=-1,
                user_defined_symbols=["\n"], normalization_rule_name="identity", remove_extra_whitespaces=False,
                split_digits=True, max_sentence_length=1 << 16, num_threads=2, minloglevel=2,
                hard_vocab_limit=True)
        except RuntimeError as e:
            needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
            if needed:
                raise TokenizerError(
                    f"model.vocab_size={vocab_size} is too small for this corpus: its byte-fallback BPE tokenizer "
                    f"needs at least {needed.group(1)} pieces (256 bytes, the special pieces and each of the "
                    f"{n_chars} distinct characters); set model.vocab_size={needed.group(1)} or more") from None
            raise TokenizerError(f"sentencepiece could not train a {vocab_size}-piece vocabulary on this corpus "
                                 f"({total} characters, {n_chars} distinct): {e}") from None
        return cls(out.getvalue())
