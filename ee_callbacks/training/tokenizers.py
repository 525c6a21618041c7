"""Tokenizers behind one small interface: ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``.

Three kinds, chosen by ``cfg.kind`` (Hydra group ``tokenizer``):

- ``byte``: UTF-8 bytes, vocabulary 256, nothing to train, no special tokens.
- ``bpe``: byte-level BPE trained with the ``tokenizers`` library on the corpus, cached on disk under
  ``<cache dir>/tokenizers/bpe-v<vocab>-<corpus hash>.json`` (cache dir: ``$EE_CACHE_DIR`` or
  ``~/.cache/ee_callbacks``), so it is trained once per corpus and vocabulary size.
- ``hf``: any local Hugging Face tokenizer directory (``AutoTokenizer.from_pretrained(path)``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BPE_EOS_TOKEN = "<|endoftext|>"
# Bump when the BPE recipe changes, so old cached tokenizers are not reused.
_BPE_RECIPE_VERSION = 1


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The on-disk cache root: ``override``, else ``$EE_CACHE_DIR``, else ``~/.cache/ee_callbacks``."""
    root = override or os.environ.get("EE_CACHE_DIR") or "~/.cache/ee_callbacks"
    path = Path(os.path.expanduser(str(root)))
    path.mkdir(parents=True, exist_ok=True)
    return path


def corpus_fingerprint(documents: Iterable[str]) -> str:
    """A short, stable hash of a list of documents (order matters)."""
    digest = hashlib.sha256()
    for document in documents:
        encoded = document.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()[:16]


class Tokenizer:
    """The interface the data pipeline needs. ``eos_id`` separates documents when not ``None``."""

    name: str = "tokenizer"
    eos_id: int | None = None

    @property
    def vocab_size(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @property
    def fingerprint(self) -> str:
        """Identifies the exact token mapping (used to key token caches)."""
        return self.name

    def to_hf(self) -> Any:
        """This tokenizer as a Hugging Face tokenizer (``save_pretrained`` / ``AutoTokenizer`` compatible), or
        ``None`` when it has no such form (the byte tokenizer)."""
        return None

    def document_separator(self) -> list[int]:
        """Ids put between documents when a corpus is concatenated: EOS if there is one, else a blank line."""
        if self.eos_id is not None:
            return [self.eos_id]
        return self.encode("\n\n")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens. Vocabulary 256; decoding replaces invalid UTF-8 sequences."""

    name = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """A byte-level BPE from the ``tokenizers`` library (trained by :func:`train_bpe`)."""

    def __init__(self, backend: Any, path: Path | None = None):
        self._backend = backend
        self.path = path
        self.eos_id = backend.token_to_id(BPE_EOS_TOKEN)
        self.name = f"bpe-{self.vocab_size}"
        self._fingerprint = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_file(str(path)), Path(path))

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        return f"bpe-{self._fingerprint}"

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_hf(self) -> Any:
        """A ``PreTrainedTokenizerFast`` around the same BPE (EOS ``<|endoftext|>``; it encodes exactly as this
        tokenizer does, no special tokens added)."""
        from tokenizers import Tokenizer as Backend
        from transformers import PreTrainedTokenizerFast

        # a copy: the wrapper may set padding/truncation on its backend, which must not change this tokenizer
        return PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(self._backend.to_str()),
                                       eos_token=BPE_EOS_TOKEN)


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory, or a hub id at a revision (online; no special tokens are added when
    encoding)."""

    def __init__(self, path: str | os.PathLike, revision: str | None = None):
        from transformers import AutoTokenizer

        from .zoo import resolve_pretrained_source

        self.path = str(path)
        source, kwargs = resolve_pretrained_source(self.path, revision, what="tokenizer.path")
        self._backend = AutoTokenizer.from_pretrained(source, **kwargs)
        self.eos_id = self._backend.eos_token_id
        self.name = f"hf:{Path(self.path).name}"

    @property
    def vocab_size(self) -> int:
        return len(self._backend)

    @property
    def fingerprint(self) -> str:
        vocab = sorted(self._backend.get_vocab().items())
        return "hf-" + hashlib.sha256(repr(vocab).encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._backend(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids])

    def to_hf(self) -> Any:
        return self._backend


def train_bpe(
    documents: Sequence[str], vocab_size: int, cache_root: str | os.PathLike | None = None, min_frequency: int = 2
) -> BPETokenizer:
    """Train (or load from the cache) a byte-level BPE with ``vocab_size`` tokens, including ``<|endoftext|>``.

    The cache key is the corpus hash plus the vocabulary size, so the same corpus never trains twice.
    """
    if vocab_size < 257 + 1:
        raise ValueError(f"tokenizer.vocab_size must be at least 258 for byte-level BPE (256 bytes + EOS + merges), "
                         f"got {vocab_size}")
    if not documents:
        raise ValueError("tokenizer=bpe needs a text corpus to train on, and the corpus is empty")
    key = f"bpe-r{_BPE_RECIPE_VERSION}-v{vocab_size}-m{min_frequency}-{corpus_fingerprint(documents)}"
    path = cache_dir(cache_root) / "tokenizers" / f"{key}.json"
    if path.exists():
        return BPETokenizer.from_file(path)

    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BPE_EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer=trainer, length=len(documents))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file and rename, so concurrent processes (DDP ranks, sweep jobs) never read half a file.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    backend.save(tmp_name)
    os.replace(tmp_name, path)
    return BPETokenizer(backend, path)


def build_tokenizer(cfg: Mapping[str, Any], corpus: Callable[[], Sequence[str]] | None = None) -> Tokenizer:
    """Build the tokenizer described by ``cfg`` (keys: ``kind`` and its options).

    ``corpus`` is a zero-argument function returning the training documents; it is only called for ``bpe``.
    """
    kind = cfg.get("kind", "byte")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if cfg.get("path"):
            return BPETokenizer.from_file(cfg["path"])
        if corpus is None:
            raise ValueError("tokenizer=bpe needs a corpus to train on (or tokenizer.path=<tokenizer.json>)")
        return train_bpe(corpus(), int(cfg.get("vocab_size", 4096)), cfg.get("cache_dir"),
                         int(cfg.get("min_frequency", 2)))
    if kind == "hf":
        path = cfg.get("path")
        if not path:
            raise ValueError("tokenizer=hf needs tokenizer.path=<local Hugging Face model or tokenizer directory>")
        return HFTokenizer(path, cfg.get("revision"))
    raise ValueError(f"unknown tokenizer.kind {kind!r}; expected one of 'byte', 'bpe', 'hf'")
