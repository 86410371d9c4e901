"""A gptjax sentencepiece BPE model as a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library's format,
which ``AutoTokenizer`` loads with no sentencepiece and no conversion step) that encodes exactly as gptjax does.

The mapping, for gptjax's tokenizer settings (identity normalisation, spaces kept, byte fallback, ``"\\n"`` a
user-defined piece, digits split, a dummy ``▁`` prefix):

* normalizer: prepend ``▁`` (sentencepiece's dummy prefix), replace ``" "`` by ``▁``; no pre-tokenizer;
* model: BPE over the same vocabulary (ids unchanged), ``byte_fallback``, with merges ``(a, b)`` for every
  normal piece ``a + b`` whose halves are pieces, ranked by the merged piece's id (sentencepiece merges the pair
  whose result scores highest, and BPE scores fall with the id); user-defined pieces (``"\\n"``) are in the
  vocabulary but in no merge, so, as in sentencepiece, nothing merges across them;
* decoder: ``▁`` -> space, byte fallback, fuse, strip the one leading space of the dummy prefix.

Checked on the whole embedded corpus (every paragraph encodes to the same ids and decodes back to itself) in
``tests/test_interop.py``. One documented difference: a literal ``</s>`` in the text is the eos token to HF
tokenizers (special tokens are matched in text) and plain bytes to sentencepiece.
"""

from __future__ import annotations

from sentencepiece import sentencepiece_model_pb2 as spm_pb

SPACE = "\u2581"
_Piece = spm_pb.ModelProto.SentencePiece


class TokenizerExportError(ValueError):
    """The sentencepiece model uses a setting the HF form here cannot reproduce exactly; the message names it."""


def _model(proto: bytes) -> spm_pb.ModelProto:
    m = spm_pb.ModelProto()
    m.ParseFromString(proto)
    return m


def hf_tokenizer_files(proto: bytes, max_len: int) -> dict[str, dict]:
    """``{"tokenizer.json": ..., "tokenizer_config.json": ..., "special_tokens_map.json": ...}`` for the
    sentencepiece model ``proto``; ``TokenizerExportError`` when it cannot be reproduced exactly."""
    m = _model(proto)
    ts, ns = m.trainer_spec, m.normalizer_spec
    problems = []
    if ts.model_type != spm_pb.TrainerSpec.BPE:
        problems.append(f"model_type={spm_pb.TrainerSpec.ModelType.Name(ts.model_type)} (only BPE is exported)")
    if ns.name not in ("identity", "") or ns.precompiled_charsmap:
        problems.append(f"normalization rule {ns.name!r} (only identity is reproduced)")
    if ns.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true")
    if ts.treat_whitespace_as_suffix or not ts.split_by_whitespace:
        problems.append("whitespace handling other than split_by_whitespace with a ▁ prefix")
    if problems:
        raise TokenizerExportError("the run's tokenizer cannot be written as an exactly equivalent HF tokenizer: "
                                   + "; ".join(problems))
    pieces = list(m.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    mergeable = {p.piece for p in pieces if p.type == _Piece.NORMAL}
    merges = []
    for piece, i in vocab.items():
        if piece not in mergeable:
            continue
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in mergeable and b in mergeable:
                merges.append((i, vocab[a], vocab[b], a, b))
    merges.sort()
    special = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}
               for i, p in enumerate(pieces) if p.type in (_Piece.CONTROL, _Piece.UNKNOWN)]
    prefix = [{"type": "Prepend", "prepend": SPACE}] if ns.add_dummy_prefix else []
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if ns.add_dummy_prefix else []
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": prefix + [
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}] + strip},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[ts.unk_id].piece,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": bool(ts.byte_fallback), "ignore_merges": False, "vocab": vocab,
                  "merges": [[a, b] for *_, a, b in merges]},
    }
    names = {"unk_token": pieces[ts.unk_id].piece if ts.unk_id >= 0 else None,
             "eos_token": pieces[ts.eos_id].piece if ts.eos_id >= 0 else None,
             "bos_token": pieces[ts.bos_id].piece if ts.bos_id >= 0 else None,
             "pad_token": pieces[ts.pad_id].piece if ts.pad_id >= 0 else None}
    names = {k: v for k, v in names.items() if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, **names}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config, "special_tokens_map.json": names}
