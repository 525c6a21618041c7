"""Corpora, split, tokenizers and the data module (ee_callbacks.training.corpus / tokenizers / data)."""

import importlib.util
import os

import numpy as np
import pytest
import torch

from ee_callbacks.training import corpus as C
from ee_callbacks.training.tokenizers import BPE_EOS_TOKEN, ByteTokenizer, build_tokenizer, train_bpe


def test_fortune_files_are_found_and_parsed():
    directory = C.fortunes_dir()
    assert (directory / "fortunes").is_file()
    documents = C.load_fortunes()
    # 12363 + 771 + 81 + 777 + 203 + 549 '%' separators in the six default files; the header quote is dropped
    assert 14000 < len(documents) < 15500
    assert all(document.strip() for document in documents)
    assert not any(line.strip() == "%" for document in documents[:500] for line in document.splitlines())
    assert not any("$FreeBSD$" in document for document in documents)
    limericks = C.load_fortunes(["limerick"])
    assert len(limericks) < len(documents)
    with pytest.raises(FileNotFoundError, match="no fortune file 'nope'"):
        C.load_fortunes(["nope"])


def test_parse_fortune_file_by_hand():
    text = "%% comment line\n%\nfirst quote\n  second line\n%\n\n%\nlast one\n"
    assert C.parse_fortune_file(text) == ["first quote\n  second line", "last one"]


def test_split_is_seeded_disjoint_and_complete():
    train_a, val_a = C.split_documents(1000, 0.05, seed=3)
    train_b, val_b = C.split_documents(1000, 0.05, seed=3)
    np.testing.assert_array_equal(train_a, train_b)
    np.testing.assert_array_equal(val_a, val_b)
    assert len(val_a) == 50
    assert set(train_a).isdisjoint(val_a)
    assert sorted(set(train_a) | set(val_a)) == list(range(1000))
    _, val_other = C.split_documents(1000, 0.05, seed=4)
    assert set(val_other) != set(val_a)
    with pytest.raises(ValueError, match="val_fraction"):
        C.split_documents(10, 1.5, seed=0)


def test_fortune_validation_blocks_are_the_same_every_time(tmp_path):
    data = {"source": "fortunes", "seq_len": 64, "val_fraction": 0.02, "split_seed": 0, "max_val_blocks": 20,
            "cache_dir": str(tmp_path)}
    tokenizer = ByteTokenizer()
    first = C.build_corpus(data, tokenizer)
    second = C.build_corpus(data, tokenizer)  # second one reads the token cache
    assert list((tmp_path / "tokens").glob("*.npz"))
    assert first.val_blocks.shape == (20, 64) and first.val_blocks.dtype == torch.long
    assert torch.equal(first.val_blocks, second.val_blocks)
    assert torch.equal(first.train_blocks, second.train_blocks)
    # the first validation block starts with the first validation quote (documents are split, then concatenated)
    documents = C.load_fortunes()
    _, val_idx = C.split_documents(len(documents), 0.02, seed=0)
    expected = documents[val_idx[0]].encode("utf-8")[:64]
    assert bytes(first.val_blocks[0, : len(expected)].tolist()) == expected
    # a different split seed gives a different validation set
    other = C.build_corpus({**data, "split_seed": 1}, tokenizer)
    assert not torch.equal(other.val_blocks, first.val_blocks)


def test_make_blocks_concatenates_with_separator_and_drops_remainder():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9])]
    blocks, _ = C.make_blocks(docs, seq_len=4, separator=[0])
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> three blocks of 4
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    blocks, _ = C.make_blocks(docs, seq_len=5, separator=[0], max_blocks=1)
    assert blocks.tolist() == [[1, 2, 3, 0, 4]]


def test_synthetic_corpus_is_seeded_and_its_structure_is_real():
    vocab = 256
    a = C.generate_synthetic(num_documents=8, document_length=300, vocab_size=vocab, seed=11)
    b = C.generate_synthetic(num_documents=8, document_length=300, vocab_size=vocab, seed=11)
    c = C.generate_synthetic(num_documents=8, document_length=300, vocab_size=vocab, seed=12)
    for x, y in zip(a.documents, b.documents):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a.documents, c.documents))

    pattern_pairs = {(int(p[i]), int(p[i + 1])) for p in a.patterns for i in range(len(p) - 1)}
    total_copies = 0
    for tokens, labels, copies in zip(a.documents, a.difficulty, a.copies):
        assert len(tokens) == len(labels) == 300
        assert tokens.min() >= 0 and tokens.max() < vocab
        for source, target, length in copies:
            np.testing.assert_array_equal(tokens[target:target + length], tokens[source:source + length])
            assert (labels[target + 1:target + length] == C.COPY).all()
            total_copies += 1
        # every "deterministic" token follows from the previous one: a counting step or the next pattern token
        for t in np.flatnonzero(labels == C.DETERMINISTIC):
            previous, current = int(tokens[t - 1]), int(tokens[t])
            assert current == (previous + 1) % vocab or (previous, current) in pattern_pairs
    assert total_copies > 10
    fractions = np.bincount(np.concatenate(a.difficulty), minlength=3) / (8 * 300)
    assert (fractions > 0.1).all()  # all three difficulty classes are well represented


def test_synthetic_blocks_carry_difficulty_labels():
    data = {"source": "synthetic", "seq_len": 32, "num_documents": 20, "document_length": 128, "val_fraction": 0.2}
    corpus = C.build_corpus(data, ByteTokenizer())
    assert corpus.val_difficulty is not None
    assert corpus.val_difficulty.shape == corpus.val_blocks.shape == (4 * 128 // 32, 32)
    with pytest.raises(ValueError, match="tokenizer=byte"):
        build_tokenizer({"kind": "bpe"}, corpus=lambda: C.load_text_documents(data))


def test_text_files_glob_and_separator(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha one\n%\nalpha two\n")
    (tmp_path / "sub" / "b.txt").write_text("beta\n")
    (tmp_path / "c.md").write_text("not matched\n")
    documents = C.read_text_files(str(tmp_path / "**" / "*.txt"))
    assert documents == ["alpha one\n%\nalpha two", "beta"]
    assert C.read_text_files([str(tmp_path / "*.txt")], document_separator=r"^%$") == ["alpha one", "alpha two"]
    with pytest.raises(FileNotFoundError, match=r"no files match .*\*\.rst"):
        C.read_text_files(str(tmp_path / "*.rst"))
    corpus_docs = C.load_text_documents({"source": "text_files", "paths": [str(tmp_path / "sub" / "*.txt")]})
    assert corpus_docs == ["beta"]


def test_hf_source_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ImportError, match="pip install datasets"):
            C.load_hf_documents("roneneldan/TinyStories")
    else:  # pragma: no cover - only where `datasets` is installed
        with pytest.raises(RuntimeError, match="offline"):
            C.load_hf_documents("surely-not/a-cached-dataset-ee-callbacks")
    with pytest.raises(ValueError, match="data.name"):
        C.load_text_documents({"source": "hf"})


def test_bpe_is_cached_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("EE_CACHE_DIR", str(tmp_path))
    documents = C.load_fortunes(["limerick"])
    tokenizer = train_bpe(documents, vocab_size=400)
    cached = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(cached) == 1 and tokenizer.path == cached[0]
    assert tokenizer.vocab_size == 400
    assert tokenizer.eos_id == tokenizer._backend.token_to_id(BPE_EOS_TOKEN)
    mtime = cached[0].stat().st_mtime_ns
    again = train_bpe(documents, vocab_size=400)  # loaded from the cache, not retrained
    assert cached[0].stat().st_mtime_ns == mtime and again.fingerprint == tokenizer.fingerprint
    for text in documents[:50] + ["naïve café — ünïcödé ✓\n\ttabs", ""]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert all(0 <= i < 400 for i in ids)
    sample = documents[0]
    assert len(tokenizer.encode(sample)) < 0.6 * len(sample.encode("utf-8"))  # merges really compress
    other = train_bpe(documents, vocab_size=300)
    assert other.vocab_size == 300 and len(list((tmp_path / "tokenizers").glob("*.json"))) == 2
    assert tokenizer.document_separator() == [tokenizer.eos_id]


def test_byte_tokenizer_round_trips():
    tokenizer = ByteTokenizer()
    text = "Murphy's law: ünïcödé ✓"
    assert tokenizer.vocab_size == 256
    assert tokenizer.encode(text) == list(text.encode("utf-8"))
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.document_separator() == [10, 10]


def test_data_module_batches_and_deterministic_validation():
    from ee_callbacks.training.data import LMDataModule

    data = {"source": "synthetic", "seq_len": 32, "batch_size": 4, "num_documents": 40, "document_length": 128,
            "val_fraction": 0.1}
    module = LMDataModule(data, {"kind": "byte"}, shuffle_seed=5)
    assert module.vocab_size == 256
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == {"input_ids"}
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    val_a = torch.cat([b["input_ids"] for b in module.val_dataloader()])
    val_b = torch.cat([b["input_ids"] for b in module.val_dataloader()])
    assert torch.equal(val_a, val_b) and torch.equal(val_a, module.val_blocks())
    assert torch.equal(C.validation_blocks(data, {"kind": "byte"}), val_a)
    # the training order comes from the module's own seeded generator, not from the global RNG
    torch.manual_seed(0)
    order_a = next(iter(module.train_dataloader()))["input_ids"]
    torch.manual_seed(1)
    order_b = next(iter(LMDataModule(data, {"kind": "byte"}, shuffle_seed=5).train_dataloader()))["input_ids"]
    assert torch.equal(order_a, order_b)
    assert module.hparams["data"]["seq_len"] == 32
    assert os.path.basename(str(C.fortunes_dir())) == "fortune"


def test_epoch_batch_sampler_shards_ranks_and_resumes():
    from ee_callbacks.training.data import EpochBatchSampler

    full = list(EpochBatchSampler(50, 4, seed=3))
    assert len(full) == 12 and len({i for b in full for i in b}) == 48  # drop_last, no index twice
    ranks = [list(EpochBatchSampler(50, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert ranks[0] == full[0::2] and ranks[1] == full[1::2]  # disjoint shards of the same global order
    resumed = EpochBatchSampler(50, 4, seed=3, skip_batches=5)
    assert list(resumed) == full[5:]  # the resumed epoch continues where it stopped
    resumed.set_epoch(1)
    assert list(resumed) == list(EpochBatchSampler(50, 4, seed=3, epoch=1))  # later epochs are whole
    assert list(EpochBatchSampler(50, 4, seed=3, epoch=1)) != full
