"""synth/text_encoder.py: the tiny CLIP tokenizer (trained BPE, CLIP's folder and vocabulary layout, the same
in every process) and text model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from d4ir.synth.plan import WEATHER_TEXT
from d4ir.synth.text_encoder import (
    BOS,
    EOS,
    WORD_END,
    byte_alphabet,
    corpus,
    load_tokenizer,
    tiny_text_parts,
    tiny_tokenizer_folder,
    train_merges,
)

ROOT = Path(__file__).resolve().parents[1]


def _digest() -> str:
    """sha256 of the tiny tokenizer's vocabulary and merges and of the tiny SD's fingerprint."""
    import hashlib

    from d4ir.synth.sd import build_tiny_sd

    merges = train_merges(tuple(corpus()))
    return hashlib.sha256(json.dumps(merges).encode()).hexdigest() + " " + build_tiny_sd(0).fingerprint


def test_byte_alphabet_is_clips():
    chars = byte_alphabet()
    assert len(set(chars)) == 256
    assert chars[ord("a")] == "a" and chars[ord("!")] == "!" and chars[ord(" ")] == "Ġ"  # space: 256 + 32
    assert chars[0] == chr(256)


def test_folder_layout_and_vocabulary(tmp_path):
    folder = tiny_tokenizer_folder(tmp_path / "tokenizer")
    names = {p.name for p in folder.iterdir()}
    assert names == {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    vocab = json.loads((folder / "vocab.json").read_text())
    lines = (folder / "merges.txt").read_text().splitlines()
    assert lines[0] == "#version: 0.2"
    merges = [tuple(line.split(" ")) for line in lines[1:]]
    # CLIP's layout: the bytes, the bytes with </w>, one token per merge in merge order, then the two specials
    order = sorted(vocab, key=vocab.get)
    assert order[:256] == list(byte_alphabet())
    assert order[256:512] == [c + WORD_END for c in byte_alphabet()]
    assert order[512:-2] == [a + b for a, b in merges]
    assert order[-2:] == [BOS, EOS] and sorted(vocab.values()) == list(range(len(vocab)))
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 77


def test_every_corpus_word_is_one_token(tmp_path):
    tok = load_tokenizer(tiny_tokenizer_folder(tmp_path))
    words = {w for text in corpus() for w in text.replace(",", " ").split()}
    assert len(words) > 300
    for word in sorted(words):
        ids = tok(word).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.convert_ids_to_tokens(ids[1:-1]) == [word + WORD_END], word
    caption = WEATHER_TEXT["derain"]  # "a photo taken in the rain, rain streaks"
    tokens = tok.convert_ids_to_tokens(tok(caption).input_ids)
    assert tokens == [BOS, "a</w>", "photo</w>", "taken</w>", "in</w>", "the</w>", "rain</w>", ",</w>", "rain</w>",
                      "streaks</w>", EOS]
    # unknown words still tokenize (into pieces), and the text is lower-cased first
    assert len(tok("Qzxv").input_ids) > 3 and tok("RAIN").input_ids == tok("rain").input_ids
    padded = tok([""], padding="max_length", max_length=77).input_ids[0]
    assert padded == [tok.bos_token_id] + [tok.eos_token_id] * 76


def test_same_tokenizer_and_weights_in_another_process():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    code = "import sys; sys.path.insert(0, 'tests'); from test_text_encoder import _digest; print(_digest())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == _digest()


def test_text_model_is_seeded_and_leaves_the_rng_alone():
    state = torch.get_rng_state()
    a, tok = tiny_text_parts(0)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = tiny_text_parts(0)
    c, _ = tiny_text_parts(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["embeddings.token_embedding.weight"], sc["embeddings.token_embedding.weight"])
    cfg = a.config
    assert (cfg.vocab_size, cfg.eos_token_id, cfg.bos_token_id) == (len(tok), tok.eos_token_id, tok.bos_token_id)
