"""A tiny CLIP text encoder and its tokenizer, built offline and deterministically (for the tiny SD).

Tokenizer: CLIP's byte-level BPE. A text is normalised (NFC, whitespace runs to one space, lower case), cut
into words (letter runs, single digits, punctuation runs, English contractions), each word's UTF-8 bytes are
mapped one to one onto printable characters (`byte_alphabet`) and its last symbol gets the end-of-word
suffix ``</w>``; then the merges are applied in rank order, and the ids are

    [<|startoftext|>] + ids(word_1) + ... + ids(word_n) + [<|endoftext|>] + padding up to 77.

The merges are learned here with the `tokenizers` library's BPE trainer from a small fixed corpus (`corpus`:
"a photo", the weather captions of synth.plan.WEATHER_TEXT and a few hundred common English words), run
until no pair is left, so every corpus word is one token. The trainer breaks count ties by token id, and the
ids of the ``x</w>`` symbols would follow a hash-map order; registering the 256 of them first (as special
tokens of the trainer, in byte order) fixes every id and makes the merges the same in every process. The
vocabulary is written in CLIP's layout: the 256 byte symbols, the same with ``</w>``, one token per merge in
merge order, then <|startoftext|> and <|endoftext|>; the folder (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json, as SD repositories ship it) is loaded with
`transformers.CLIPTokenizer.from_pretrained`.

Text model: `transformers.CLIPTextModel`, h = LN_final(Transformer_causal(E_tok[ids] + E_pos)) [B, 77, D],
with D = 32 (the tiny UNet's cross_attention_dim), 2 layers and fixed-seed random weights.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"
MAX_LENGTH = 77  # CLIP's context length: SD's UNet only ever saw 77-token contexts

# CLIP's word split (tokenizers' Regex syntax); the same pattern transformers' CLIPTokenizer uses.
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# Common English words for captions: scenes, weather, light, colours, and the words that hold them together.
WORDS = """
a an the this that these those some many few all every each no one two three four five
of in on at by for with without from to into onto over under above below near behind between
through across along around after before during while and or but so as than then there here
is are was were be been being has have had do does did can could will would should may might
it its they them their we our you your he his she her i my me us who what which where when
photo picture image shot scene view landscape portrait close up wide high low quality detailed
sharp blurry clear dark bright light shadow shadows sun sunny sunlight sunset sunrise morning
evening night day noon dusk dawn sky skies cloud clouds cloudy overcast storm stormy thunder
lightning rain rainy raining rainfall drizzle shower downpour drops droplets streak streaks wet
puddle puddles umbrella haze hazy fog foggy mist misty smog smoke dust dusty thick thin dense
snow snowy snowing snowfall snowflake snowflakes flake flakes frost frosty ice icy cold winter
summer spring autumn fall weather wind windy hot warm cool gray grey white black red green blue
yellow orange brown pink purple golden silver color colour colors colorful pale faded soft hard
city town village street streets road roads highway bridge car cars bus truck bike train traffic
sidewalk building buildings house houses tower window windows door wall roof park garden yard
tree trees forest wood woods leaf leaves grass field fields flower flowers plant plants bush
mountain mountains hill hills valley rock rocks stone cliff river lake sea ocean beach sand
coast wave waves water pond island desert countryside farm fence path trail
person people man woman child children boy girl crowd walking standing sitting running riding
dog cat bird birds horse cow animal animals boat ship plane airport station market shop store
restaurant cafe table chair bench lamp sign signs light lights pole wire fence
taken captured seen looking covered filled falling fallen heavy light strong weak little big
small large long short tall old new empty busy quiet beautiful ugly natural urban rural outdoor
outside inside indoor front back top bottom left right center middle side distance background
foreground camera lens focus noise grain glare reflection reflections visibility
""".split()


def corpus() -> list[str]:
    """The training texts: "a photo", every weather caption, and the common words (one text each)."""
    from .plan import WEATHER_TEXT  # here: synth.plan imports synth.sd, which imports this module

    return ["a photo", *WEATHER_TEXT.values(), *dict.fromkeys(WORDS)]


@functools.cache
def byte_alphabet() -> tuple[str, ...]:
    """The printable character standing for each byte value 0..255 (CLIP's and GPT-2's byte map): bytes
    that are printable Latin-1 characters stand for themselves, the others for 256, 257, ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


@functools.cache
def train_merges(texts: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """BPE merges learned from `texts` with tokenizers' BPE trainer under CLIP's normaliser and word split,
    until every word is one token. Deterministic (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token=EOS, end_of_word_suffix=WORD_END, continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    alphabet = byte_alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # no limit: merge until no pair is left
        min_frequency=1,
        show_progress=False,
        initial_alphabet=list(alphabet),
        end_of_word_suffix=WORD_END,
        special_tokens=[c + WORD_END for c in alphabet],  # fixed ids for the word-end symbols
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    pairs = []
    for pair in json.loads(tok.to_str())["model"]["merges"]:  # [a, b] lists (older tokenizers: "a b" strings)
        a, b = pair.split(" ") if isinstance(pair, str) else pair
        pairs.append((a, b))
    return tuple(pairs)


def clip_vocab(merges: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + </w>, one token per merge, then BOS and EOS."""
    alphabet = byte_alphabet()
    tokens = [*alphabet, *(c + WORD_END for c in alphabet), *(a + b for a, b in merges), BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    if len(vocab) != len(tokens):
        raise ValueError("the merges produce a token twice; not a valid CLIP vocabulary")
    return vocab


def write_tokenizer_folder(
    folder: str | Path,
    vocab: dict[str, int],
    merges: tuple[tuple[str, str], ...],
    *,
    pad_token: str = EOS,
    model_max_length: int = MAX_LENGTH,
) -> Path:
    """Write a CLIP tokenizer folder as SD repositories ship it: vocab.json, merges.txt, tokenizer_config.json
    and special_tokens_map.json.

    Args:
        folder: the folder to write (created).
        vocab: token -> id.
        merges: BPE merges in rank order.
        pad_token: the padding token (SD1.x pads with <|endoftext|>, SD2.x with "!").
        model_max_length: the length texts are padded/truncated to.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = special | {"tokenizer_class": "CLIPTokenizer", "model_max_length": int(model_max_length),
                        "do_lower_case": True, "add_prefix_space": False, "errors": "replace"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def tiny_tokenizer_folder(folder: str | Path, *, pad_token: str = EOS) -> Path:
    """Write the tiny tokenizer (BPE trained on `corpus()`) as a tokenizer folder."""
    merges = train_merges(tuple(corpus()))
    return write_tokenizer_folder(folder, clip_vocab(merges), merges, pad_token=pad_token)


def save_tokenizer(tokenizer: Any, folder: str | Path) -> Path:
    """Write a loaded CLIP tokenizer in the SD-repository layout (transformers 5's save_pretrained writes only
    tokenizer.json, which older readers of SD folders do not expect)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return write_tokenizer_folder(folder, model["vocab"], merges, pad_token=str(tokenizer.pad_token),
                                  model_max_length=int(tokenizer.model_max_length))


def load_tokenizer(folder: str | Path) -> Any:
    """`transformers.CLIPTokenizer` from a tokenizer folder (no network)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tiny_tokenizer(pad_token: str = EOS) -> Any:
    """The tiny CLIP tokenizer (trained on `corpus()`), written to a temporary folder and loaded from it."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_tokenizer(tiny_tokenizer_folder(tmp, pad_token=pad_token))


def text_model(
    tokenizer: Any,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 64,
    hidden_act: str = "quick_gelu",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **config: Any,
) -> torch.nn.Module:
    """A `transformers.CLIPTextModel` sized for `tokenizer`, with fixed-seed random weights drawn on the CPU.

    Args:
        tokenizer: its vocabulary size and special-token ids go into the config.
        hidden: D, the width of a token embedding (the UNet's cross_attention_dim).
        layers, heads, intermediate: transformer depth, attention heads and MLP width.
        hidden_act: quick_gelu (SD1.x's CLIP ViT-L) or gelu (SD2.x's OpenCLIP).
        seed: weight seed; the global RNG is left as it was.
        device, dtype: where the weights go and their dtype.
        config: other `CLIPTextConfig` fields (they override the ids taken from the tokenizer).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=intermediate, hidden_act=hidden_act,
                         max_position_embeddings=MAX_LENGTH, **(ids | config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(cfg)
    return model.to(device=device, dtype=dtype).eval()


def tiny_text_parts(
    seed: int = 0, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """(text encoder, tokenizer) of the tiny SD: D = 32, 2 layers, 77 positions."""
    tokenizer = tiny_tokenizer()
    return text_model(tokenizer, seed=seed, device=device, dtype=dtype), tokenizer
