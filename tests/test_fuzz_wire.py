"""Fuzzing the wire (issue #6): hypothesis-generated requests against a real
``modelcache serve`` process on loopback, at least 10,000 per RPC (Embed, LogProbs,
ListModels, grpc.health.v1 Check), plus malformed protobuf bytes on a raw channel.

Every answer is checked against an oracle that follows the status contract of
``servicer.py``: the exact code each request must get (and a phrase of its message), with
RESOURCE_EXHAUSTED also allowed once a request has passed the checks that come before
admission. Successful answers are checked for shape, token ids (against the model's own
tokenizer), finiteness and normalisation. Never UNKNOWN, INTERNAL or a timeout; the process
never dies and logs no traceback; and afterwards it returns the same bytes for the same
requests as before the fuzz.

Speed: tiny models (2 layers, width 64, max_length 24/32), small inputs mostly, and each
hypothesis example is a batch of requests sent concurrently (futures on one channel), so
the server batches and the 2 cores stay busy.
"""

from __future__ import annotations

import collections
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tiny_models
from fault_models import bare_tokenizer, copy_model, small_gpt2, truncate_weights
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from modelcache.daemon.rpcstatus import clip
from modelcache.v1 import modelcache_pb2 as pb
from modelcache.v1 import modelcache_pb2_grpc as pb_grpc

pytest.register_assert_rewrite("daemon_process")
from daemon_process import ServeProcess  # noqa: E402

Code = grpc.StatusCode
OK = Code.OK
IA, NF, FP, RE = (
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED,
)
PER_RPC = 10_000
BATCH = 50  # requests per hypothesis example, all in flight at once
RAW_PER_BATCH = 10  # malformed/mutated byte strings per example for Embed/LogProbs/Check
EXAMPLES = PER_RPC // BATCH
MAX_INPUTS, MAX_CHARS, MAX_TOP_K = 256, 200_000, 20  # BatchingConfig defaults, MAX_TOP_K
MAX_MESSAGE = 64 * 1024 * 1024
CALL_TIMEOUT = 60.0  # an answer slower than this is a hang
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

EMBED, LOGPROBS = "/modelcache.v1.ModelCache/Embed", "/modelcache.v1.ModelCache/LogProbs"
LIST, CHECK = "/modelcache.v1.ModelCache/ListModels", "/grpc.health.v1.Health/Check"
KINDS: dict[str, type[Message]] = {
    EMBED: pb.EmbedRequest,
    LOGPROBS: pb.LogProbsRequest,
    LIST: pb.ListModelsRequest,
    CHECK: health_pb2.HealthCheckRequest,
}
RESPONSES: dict[str, type[Message]] = {
    EMBED: pb.EmbedResponse,
    LOGPROBS: pb.LogProbsResponse,
    LIST: pb.ListModelsResponse,
    CHECK: health_pb2.HealthCheckResponse,
}


# -- the daemon under fuzz ---------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-models")
    bert, gpt2 = tiny_models.bert(root / "bert"), small_gpt2(root / "gpt2")
    broken = copy_model(gpt2, root / "broken")
    truncate_weights(broken)
    return {
        "bert": bert,
        "gpt2": gpt2,
        "broken": broken,
        "bare-bert": bare_tokenizer(copy_model(bert, root / "bare-bert")),
        "bare-gpt2": small_gpt2(root / "bare-gpt2", special_tokens=False, seed=1),
    }


def fuzz_config(paths: dict[str, Path]) -> dict[str, Any]:
    def m(name: str, key: str, task: str, **kw: Any) -> dict[str, Any]:
        return {"name": name, "source": str(paths[key]), "task": task, **kw}

    return {
        "models": [
            m("emb", "bert", "embedding", max_length=32),
            # no special tokens: whitespace alone is zero tokens; "last" pooling indexes by length
            m("bare-emb", "bare-bert", "embedding", max_length=32, pooling="last", normalize=False),
            m("lm", "gpt2", "causal-lm", max_length=24),
            m("bare-lm", "bare-gpt2", "causal-lm", max_length=24),
            m("broken", "broken", "causal-lm"),
        ]
    }


@pytest.fixture(scope="module")
def daemon(
    fuzz_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    proc = ServeProcess(
        fuzz_config(fuzz_models),
        tmp_path_factory.mktemp("fuzz-daemon"),
        env={"MODELCACHE_GRPC_THREADS": "4"},
        name="fuzz",
    )
    with proc:
        listing = proc.wait_settled()
        states = {m.name: m.state for m in listing.models}
        assert states == {
            "emb": pb.ModelStatus.READY,
            "bare-emb": pb.ModelStatus.READY,
            "lm": pb.ModelStatus.READY,
            "bare-lm": pb.ModelStatus.READY,
            "broken": pb.ModelStatus.FAILED,
        }, states
        yield proc
    log = proc.log()
    assert "Traceback" not in log, log[-5000:]


@dataclass
class Model:
    name: str
    task: str
    ready: bool
    max_length: int
    dims: int  # embedding width, or vocabulary size
    normalize: bool
    fingerprint: str
    tokenizer: Any


@pytest.fixture(scope="module")
def oracle(daemon: ServeProcess, fuzz_models: dict[str, Path]) -> Oracle:
    cfg = {m["name"]: m for m in fuzz_config(fuzz_models)["models"]}
    models = {}
    for m in daemon.list_models().models:
        ready = m.state == pb.ModelStatus.READY
        models[m.name] = Model(
            m.name,
            m.task,
            ready,
            m.max_length,
            m.output_dims,
            cfg[m.name].get("normalize", True),
            m.fingerprint,
            AutoTokenizer.from_pretrained(cfg[m.name]["source"]) if ready else None,
        )
    return Oracle(models)


@pytest.fixture(scope="module")
def wire(daemon: ServeProcess) -> Iterator[Wire]:
    w = Wire(daemon.address)
    yield w
    w.close()


# -- sending -----------------------------------------------------------------------------
@dataclass
class Outcome:
    code: Code
    details: str
    response: bytes | None
    seconds: float


class Wire:
    """One channel; typed stubs and raw (identity-serialised) callables; batches of calls
    in flight together; counts of requests actually answered, per RPC."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", 2 * MAX_MESSAGE),
            ],
        )
        self.raw = {path: self.channel.unary_unary(path) for path in KINDS}
        stub = pb_grpc.ModelCacheStub(self.channel)  # type: ignore[no-untyped-call]
        health = health_pb2_grpc.HealthStub(self.channel)
        self.typed = {
            EMBED: stub.Embed,
            LOGPROBS: stub.LogProbs,
            LIST: stub.ListModels,
            CHECK: health.Check,
        }
        self.sent: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.reasons: collections.Counter[tuple[str, str]] = collections.Counter()

    def close(self) -> None:
        self.channel.close()

    def send(self, calls: Sequence[tuple[str, Message | bytes]]) -> list[Outcome]:
        started = time.perf_counter()
        futures = []
        for path, req in calls:
            fn = self.raw[path] if isinstance(req, bytes) else self.typed[path]
            futures.append(fn.future(req, timeout=CALL_TIMEOUT))
        out = []
        for (path, req), fut in zip(calls, futures, strict=True):
            exc = fut.exception()
            if exc is None:
                resp = fut.result()
                body = resp if isinstance(resp, bytes) else resp.SerializeToString()
                outcome = Outcome(OK, "", body, time.perf_counter() - started)
            else:
                outcome = Outcome(
                    exc.code(), exc.details() or "", None, time.perf_counter() - started
                )
            self.sent[path + (":raw" if isinstance(req, bytes) else "")] += 1
            self.codes[(path, outcome.code.name)] += 1
            out.append(outcome)
        return out


# -- the oracle: which status each request must get ------------------------------------
@dataclass
class Expect:
    code: Code
    phrase: str = ""  # a part of the status message
    admitted: bool = False  # reached the queue check: RESOURCE_EXHAUSTED is also allowed
    check: Callable[[bytes], None] | None = None  # for OK: validate the response
    allowed: set[Code] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.allowed = {self.code} | ({RE} if self.admitted else set())


def _f32(blob: bytes) -> np.ndarray[Any, Any]:
    return np.frombuffer(blob, dtype="<f4")


def _i32(blob: bytes) -> np.ndarray[Any, Any]:
    return np.frombuffer(blob, dtype="<i4")


class Oracle:
    def __init__(self, models: dict[str, Model]) -> None:
        self.models = models
        listing = {"": "NOT_SERVING", "modelcache.v1.ModelCache": "NOT_SERVING"}
        for m in models.values():
            listing[m.name] = "SERVING" if m.ready else "NOT_SERVING"
        self.health = listing

    def expect(self, path: str, req: Message | bytes) -> Expect:
        if isinstance(req, bytes):
            if len(req) > MAX_MESSAGE:
                return Expect(RE)
            try:
                parsed = KINDS[path].FromString(req)
            except (DecodeError, ValueError):
                return Expect(IA, "is not a valid")
            req = parsed
        if path == EMBED:
            return self.embed(req)  # type: ignore[arg-type]
        if path == LOGPROBS:
            return self.logprobs(req)  # type: ignore[arg-type]
        if path == LIST:
            return Expect(OK, check=self.check_list)
        service = req.service  # type: ignore[attr-defined]
        if service not in self.health:
            return Expect(NF)
        status = self.health[service]

        def check(body: bytes) -> None:
            got = health_pb2.HealthCheckResponse.FromString(body).status
            assert health_pb2.HealthCheckResponse.ServingStatus.Name(got) == status

        return Expect(OK, check=check)

    def _model(self, name: str, task: str, method: str) -> Model | Expect:
        if not name:
            return Expect(IA, "model is required")
        m = self.models.get(name)
        if m is None:
            return Expect(NF, "is not configured")
        if m.task != task:
            return Expect(FP, f"{method} needs a")
        return m

    @staticmethod
    def _texts(texts: Sequence[str], what: str) -> Expect | None:
        if len(texts) > MAX_INPUTS:
            return Expect(IA, f"{what}; at most {MAX_INPUTS} per request")
        for i, t in enumerate(texts):
            if not t:
                return Expect(IA, f"{what}[{i}] is empty")
            if len(t) > MAX_CHARS:
                return Expect(IA, f"{what}[{i}] has {len(t)} characters")
        return None

    def _tokenize(self, m: Model, texts: Sequence[str], truncate: bool) -> list[list[int]] | Expect:
        enc = m.tokenizer(
            list(texts),
            add_special_tokens=True,
            truncation=truncate,
            max_length=m.max_length if truncate else None,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        for i, seq in enumerate(enc["input_ids"]):
            if not seq:
                return Expect(IA, f"inputs[{i}] has no tokens", admitted=True)
            if not truncate and len(seq) > m.max_length:
                return Expect(IA, f"inputs[{i}] has {len(seq)} tokens", admitted=True)
        ids: list[list[int]] = enc["input_ids"]
        return ids

    def embed(self, req: pb.EmbedRequest) -> Expect:
        m = self._model(req.model, "embedding", "Embed")
        if isinstance(m, Expect):
            return m
        if not req.inputs:
            return Expect(IA, "inputs is empty")
        if (bad := self._texts(req.inputs, "inputs")) is not None:
            return bad
        if not m.ready:
            return Expect(FP, "failed to load")
        ids = self._tokenize(m, req.inputs, req.truncate)
        if isinstance(ids, Expect):
            return ids
        normalize = req.normalize if req.HasField("normalize") else m.normalize

        def check(body: bytes) -> None:
            resp = pb.EmbedResponse.FromString(body)
            assert (resp.model, resp.rows, resp.dims) == (req.model, len(ids), m.dims)
            assert list(resp.token_counts) == [len(s) for s in ids]
            assert resp.fingerprint == m.fingerprint
            emb = _f32(resp.embeddings).reshape(resp.rows, resp.dims)
            assert np.isfinite(emb).all()
            if normalize:
                np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)

        return Expect(OK, admitted=True, check=check)

    def logprobs(self, req: pb.LogProbsRequest) -> Expect:
        m = self._model(req.model, "causal-lm", "LogProbs")
        if isinstance(m, Expect):
            return m
        if bool(req.inputs) == bool(req.token_ids):
            return Expect(IA, f"({'both' if req.inputs else 'neither'} is)")
        if req.top_k > MAX_TOP_K:
            return Expect(IA, f"top_k {req.top_k} is out of range")
        if req.inputs:
            if (bad := self._texts(req.inputs, "inputs")) is not None:
                return bad
        elif len(req.token_ids) > MAX_INPUTS:
            return Expect(IA, f"{len(req.token_ids)} token_ids; at most")
        if not m.ready:
            return Expect(FP, "failed to load")
        if req.inputs:
            tokenized = self._tokenize(m, req.inputs, req.truncate)
            if isinstance(tokenized, Expect):
                return tokenized
            ids = tokenized
        else:
            ids = []
            for i, t in enumerate(req.token_ids):
                seq = list(t.ids)
                if not seq:
                    return Expect(IA, f"token_ids[{i}] is empty", admitted=True)
                bad = [j for j, v in enumerate(seq) if not 0 <= v < m.dims]
                if bad:
                    return Expect(
                        IA, f"token_ids[{i}][{bad[0]}] = {seq[bad[0]]} is outside", admitted=True
                    )
                if len(seq) > m.max_length:
                    if not req.truncate:
                        return Expect(IA, f"token_ids[{i}] has {len(seq)} tokens", admitted=True)
                    seq = seq[: m.max_length]
                ids.append(seq)
        k = req.top_k

        def check(body: bytes) -> None:
            resp = pb.LogProbsResponse.FromString(body)
            assert (resp.model, resp.top_k, len(resp.sequences)) == (req.model, k, len(ids))
            assert resp.fingerprint == m.fingerprint
            for s, want in zip(resp.sequences, ids, strict=True):
                n = len(want)
                assert s.num_tokens == n and _i32(s.token_ids).tolist() == want
                lp = _f32(s.logprobs)
                assert lp.shape == (n - 1,) and np.isfinite(lp).all() and (lp <= 1e-5).all()
                for blob, on in (
                    (s.entropy, req.entropy),
                    (s.expected_logprob, req.expected_logprob),
                    (s.logprob_variance, req.expected_logprob),
                ):
                    v = _f32(blob)
                    assert v.shape == ((n - 1,) if on else (0,)) and np.isfinite(v).all()
                if req.entropy:
                    assert (_f32(s.entropy) >= -1e-4).all()
                rank = _i32(s.rank)
                assert rank.shape == ((n - 1,) if req.rank else (0,))
                assert ((rank >= 0) & (rank < m.dims)).all()
                top_ids, top_lp = _i32(s.top_k_ids), _f32(s.top_k_logprobs)
                assert top_ids.shape == top_lp.shape == ((n - 1) * k,)
                if k and n > 1:
                    top_lp = top_lp.reshape(n - 1, k)
                    assert (np.diff(top_lp, axis=1) <= 1e-6).all()
                    assert (lp <= top_lp[:, 0] + 1e-4).all()
                    assert ((top_ids >= 0) & (top_ids < m.dims)).all()

        return Expect(OK, admitted=True, check=check)

    def check_list(self, body: bytes) -> None:
        resp = pb.ListModelsResponse.FromString(body)
        got = {x.name: (x.state == pb.ModelStatus.READY, x.fingerprint) for x in resp.models}
        assert got == {m.name: (m.ready, m.fingerprint) for m in self.models.values()}


def verify(
    oracle: Oracle,
    wire: Wire,
    calls: Sequence[tuple[str, Message | bytes]],
    outcomes: Sequence[Outcome],
) -> None:
    for (path, req), got in zip(calls, outcomes, strict=True):
        want = oracle.expect(path, req)
        wire.reasons[(path, f"{got.code.name} {re.sub(r'[0-9]+', 'N', want.phrase)}")] += 1
        shown = repr(req)[:300]
        assert got.code in want.allowed, (
            f"{path} {shown}: got {got.code.name} ({got.details[:300]!r}), "
            f"expected {want.code.name} ({want.phrase!r})"
        )
        if got.code == want.code and want.phrase:
            assert want.phrase in got.details, (path, shown, got.details[:300], want.phrase)
        if got.code == RE:
            assert (
                "queue full" in got.details
                or len(bytes(req) if isinstance(req, bytes) else req.SerializeToString())
                > MAX_MESSAGE
            )
        if got.code == OK and want.check is not None:
            assert got.response is not None
            try:
                want.check(got.response)
            except AssertionError as exc:
                raise AssertionError(f"{path} {shown}: bad response: {exc}") from exc


# -- strategies --------------------------------------------------------------------------
EDGE = [
    "\x00",
    "\x01",
    "\x1b",
    "\x7f",
    "\u0301",
    "\u0300\u0301\u0302",
    "\u202e",
    "\u200f",
    "\u200b",
    "\u200d",
    "\ufeff",
    "\ufffd",
    "\uffff",
    "\U0010ffff",
    "\ue000",
    "🙂",
    "👨\u200d👩\u200d👧\u200d👦",
    "🇺🇳",
    " ",
    "\t",
    "\n",
    "\r\n",
    "\u3000",
    "\u00a0",
    "\u2028",
    "é",
    "e\u0301",
    "ß",
    "İ",
    "ﷺ",
    "\U0001d518\U0001d52b\U0001d526",
    "עברית",
    "العربية",
    "中文",
    "[CLS]",
    "[SEP]",
    "[PAD]",
    "[UNK]",
    "[MASK]",
    "##",
    "word",
    "a" * 120,
    ".",
]
INVISIBLE = st.characters(categories=["Mn", "Me", "Cf", "Cc", "Zs", "Zl", "Zp", "Co", "Cn"])
small_text = st.one_of(
    st.text(max_size=24),  # any code point but surrogates (protobuf cannot carry those)
    st.lists(st.sampled_from(EDGE), min_size=1, max_size=6).map("".join),
    st.text(INVISIBLE, min_size=1, max_size=8),
    st.sampled_from(EDGE),
)
medium_text = st.lists(
    st.sampled_from(["the", "of", "and", "model", "cache", "##s", "🙂", "é", "a", "\u0301", "x"]),
    min_size=10,
    max_size=60,
).map(" ".join)
huge_text = st.builds(
    lambda piece, n: piece * n,
    st.sampled_from(["word ", "a", "🙂", "\u0301", " ", "x\x00", "中"]),
    st.sampled_from([1000, 5000, 40_000, 199_999, 200_000, 200_001]),
)


@st.composite
def text_input(draw: st.DrawFn) -> str:
    roll = draw(st.integers(0, 199))
    if roll == 137:
        return draw(huge_text)
    if roll < 6:
        return ""
    if roll < 20:  # around max_length: truncated, or too long without truncate
        return draw(medium_text)
    return draw(small_text)


@st.composite
def text_inputs(draw: st.DrawFn) -> list[str]:
    roll = draw(st.integers(0, 99))
    if roll == 42:  # the per-request count limit
        return [draw(small_text) or "x"] * draw(st.sampled_from([255, 256, 257, 1000]))
    return draw(st.lists(text_input(), min_size=0 if roll < 10 else 1, max_size=4))


def weighted(draw: st.DrawFn, *choices: tuple[int, st.SearchStrategy[Any]]) -> Any:
    """Draw from one of the strategies with the given weights (one_of's are uneven)."""
    roll = draw(st.integers(0, sum(w for w, _ in choices) - 1))
    for w, strategy in choices:
        if roll < w:
            return draw(strategy)
        roll -= w
    raise AssertionError("unreachable")


ODD_NAMES = [
    "",
    "nope",
    "EMB",
    "emb ",
    " emb",
    "emb\x00",
    "../emb",
    "lm/../lm",
    "broken",
    "bare-emb\u200b",
    "\uff45\uff4d\uff42",
    "modelcache.v1.ModelCache",
    "x" * 10_000,
]


@st.composite
def model_names(draw: st.DrawFn, good: Sequence[str]) -> str:
    name: str = weighted(
        draw,
        (14, st.sampled_from(good)),
        (2, st.sampled_from(["emb", "bare-emb", "lm", "bare-lm", "broken"])),
        (2, st.sampled_from(ODD_NAMES)),
        (2, st.text(max_size=12)),
    )
    return name


@st.composite
def embed_requests(draw: st.DrawFn) -> pb.EmbedRequest:
    req = pb.EmbedRequest(
        model=draw(model_names(["emb", "bare-emb"])),
        inputs=draw(text_inputs()),
        truncate=draw(st.booleans()),
    )
    normalize = draw(st.none() | st.booleans())
    if normalize is not None:
        req.normalize = normalize
    return req


INT32 = st.integers(-(2**31), 2**31 - 1)
LM_VOCAB = 2048  # small_gpt2's
token_id = st.one_of(
    st.integers(0, LM_VOCAB - 1),
    st.integers(0, 200),
    st.sampled_from([0, 2, 3, LM_VOCAB - 1, LM_VOCAB, tiny_models.VOCAB, -1, 2**31 - 1, -(2**31)]),
    INT32,
)


@st.composite
def token_seqs(draw: st.DrawFn) -> list[list[int]]:
    roll = draw(st.integers(0, 49))
    if roll == 7:
        return [[7] * draw(st.sampled_from([24, 25, 300, 5000]))]
    if roll == 8:
        return [[5, 6]] * draw(st.sampled_from([256, 257]))
    if roll < 30:  # all in the vocabulary
        seq = st.lists(st.integers(0, LM_VOCAB - 1), min_size=1, max_size=30)
        return draw(st.lists(seq, min_size=1, max_size=4))
    return draw(st.lists(st.lists(token_id, max_size=30), min_size=1, max_size=4))


@st.composite
def logprobs_requests(draw: st.DrawFn) -> pb.LogProbsRequest:
    shape = weighted(
        draw,
        (9, st.sampled_from(["inputs", "token_ids"])),
        (1, st.sampled_from(["both", "neither"])),
    )
    top_k = weighted(
        draw,
        (18, st.integers(0, MAX_TOP_K)),
        (1, st.sampled_from([21, 1000, 2**31, 2**32 - 1])),
        (1, st.integers(0, 2**32 - 1)),
    )
    inputs = draw(text_inputs()) if shape in ("inputs", "both") else []
    seqs = draw(token_seqs()) if shape in ("token_ids", "both") else []
    return pb.LogProbsRequest(
        model=draw(model_names(["lm", "bare-lm"])),
        inputs=inputs,
        token_ids=[pb.TokenIds(ids=s) for s in seqs],
        top_k=top_k,
        truncate=draw(st.booleans()),
        entropy=draw(st.booleans()),
        expected_logprob=draw(st.booleans()),
        rank=draw(st.booleans()),
    )


def health_requests() -> st.SearchStrategy[health_pb2.HealthCheckRequest]:
    services = st.one_of(
        st.sampled_from(
            [
                "",
                "modelcache.v1.ModelCache",
                "emb",
                "bare-emb",
                "lm",
                "bare-lm",
                "broken",
                "grpc.health.v1.Health",
                "nope",
                "EMB",
                "emb\x00",
            ]
        ),
        st.text(max_size=24),
        st.lists(st.sampled_from(EDGE), max_size=4).map("".join),
    )
    return st.builds(health_pb2.HealthCheckRequest, service=services)


# Raw bytes: random, valid messages mutated, and protobuf wire records built by hand
# (wrong wire types, bad UTF-8 in strings, lying lengths, overlong varints, groups).
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


@st.composite
def wire_record(draw: st.DrawFn, depth: int = 0) -> bytes:
    number = draw(
        st.one_of(
            st.integers(1, 9),
            st.integers(1, 9),
            st.sampled_from([0, 15, 16, 2047, 2**29 - 1]),
            st.integers(0, 2**29 - 1),
        )
    )
    wire_type = draw(st.sampled_from([0, 2, 0, 2, 1, 5, 3, 4, 6, 7]))
    key = _varint((number << 3) | wire_type)
    if wire_type == 0:
        value = draw(
            st.one_of(
                st.integers(-(2**63), 2**64 - 1).map(_varint),
                st.sampled_from(
                    [
                        b"\xff" * 10 + b"\x01",
                        b"\x80",
                        b"\xff" * 11,
                        b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00",
                    ]
                ),
            )
        )
        return key + value
    if wire_type in (1, 5):
        return key + draw(st.binary(min_size=0, max_size=8 if wire_type == 1 else 4))
    if wire_type == 2:
        content = draw(
            st.one_of(
                st.text(max_size=20).map(lambda s: s.encode("utf-8")),
                st.binary(max_size=24),  # mostly invalid UTF-8
                st.sampled_from(
                    [
                        b"\xc3\x28",
                        b"\xed\xa0\x80",
                        b"\xf4\x90\x80\x80",
                        b"\xc0\xaf",
                        b"\xff",
                        b"emb",
                        b"lm",
                        b"",
                    ]
                ),
                st.lists(st.integers(-(2**63), 2**64 - 1).map(_varint), max_size=8).map(
                    b"".join
                ),  # packed ids (TokenIds.ids)
                (wire_record(depth + 1) if depth < 2 else st.just(b"\x08\x01")),
            )
        )
        length = draw(
            st.one_of(
                st.just(len(content)),
                st.just(len(content)),
                st.integers(0, len(content) + 4),
                st.sampled_from([2**31, 2**32 - 1, 2**63]),
            )
        )
        return key + _varint(length) + content
    return key  # groups (3, 4) and the invalid wire types 6 and 7


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[Message]) -> bytes:
    blob = bytearray(draw(base).SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        at = draw(st.integers(0, len(blob)))
        if op == "flip" and blob:
            blob[min(at, len(blob) - 1)] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del blob[at:]
        elif op == "insert":
            blob[at:at] = draw(st.binary(min_size=1, max_size=6))
        else:
            blob += blob[at:]
    return bytes(blob)


def raw_bytes(base: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=64),
        st.lists(wire_record(), max_size=6).map(b"".join),
        st.lists(wire_record(), max_size=6).map(b"".join),
        mutated(base),
        mutated(base),
    )


# -- known edge cases, reproduced exactly first ----------------------------------------
def code_of(call: Any, req: Any) -> tuple[Code, str]:
    try:
        call(req, timeout=CALL_TIMEOUT)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


@pytest.mark.parametrize("text", [" ", "\x00", "\u200b", "\u0301", "\ufeff \t\n"])
def test_input_with_no_tokens_is_invalid_argument(wire: Wire, text: str) -> None:
    """A tokenizer without special tokens makes nothing of these; that was INTERNAL alone
    (a forward pass over a [1, 0] tensor) and garbage in a batch ("last" pooling read a
    padding position)."""
    for call, req in (
        (wire.typed[EMBED], pb.EmbedRequest(model="bare-emb", inputs=[text])),
        (wire.typed[EMBED], pb.EmbedRequest(model="bare-emb", inputs=["fine", text])),
        (wire.typed[LOGPROBS], pb.LogProbsRequest(model="bare-lm", inputs=["fine", text])),
    ):
        code, details = code_of(call, req)
        assert code == IA and "inputs[" in details and "has no tokens" in details, details
    code, _ = code_of(wire.typed[EMBED], pb.EmbedRequest(model="emb", inputs=[text]))
    assert code == OK  # with [CLS] ... [SEP] there are always tokens


def test_malformed_health_requests_are_invalid_argument(wire: Wire, daemon: ServeProcess) -> None:
    """gRPC's own deserializer answered these UNKNOWN."""
    for blob in (b"\x0a\xff\xff", b"\x0a\x02\xc3\x28", b"\xff"):
        code, details = code_of(wire.raw[CHECK], blob)
        assert code == IA and "grpc.health.v1.HealthCheckRequest" in details, (code, details)
        watch = wire.channel.unary_stream("/grpc.health.v1.Health/Watch")(blob, timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            next(watch)
        assert info.value.code() == IA
    assert code_of(wire.raw[CHECK], b"\x0a\x02lm") == (OK, "")


def test_a_long_unknown_model_name_is_not_found(wire: Wire) -> None:
    """The name was echoed whole into the status message: past 8 KiB of trailer the client
    dropped it and saw RESOURCE_EXHAUSTED ("received metadata size exceeds soft limit")."""
    for name in ("x" * 10_000, "\U0001f642" * 3000, "\x00" * 5000):
        code, details = code_of(wire.typed[EMBED], pb.EmbedRequest(model=name, inputs=["x"]))
        assert code == NF and "is not configured" in details, (code, details[:200])
        assert f"({len(name)} chars)" in details
    assert len(clip("\u00e9" * 5000).encode()) < 2100 and clip("short") == "short"


# -- the fuzz ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def before(wire: Wire) -> dict[str, bytes]:
    """Reference answers before any fuzz (each request alone, so batch composition is the
    same before and after): compared byte for byte at the end of the module."""
    return probe(wire)


def probe(wire: Wire) -> dict[str, bytes]:
    reqs = {
        "embed": (
            EMBED,
            pb.EmbedRequest(
                model="emb",
                inputs=["the same sentence before and after the fuzz", "🙂 and ünïcödé"],
            ),
        ),
        "embed-bare": (EMBED, pb.EmbedRequest(model="bare-emb", inputs=["last pooling"])),
        "logprobs": (
            LOGPROBS,
            pb.LogProbsRequest(
                model="lm",
                token_ids=[pb.TokenIds(ids=[2, 1023, 1003, 1037, 1231, 3])],
                top_k=5,
                entropy=True,
                expected_logprob=True,
                rank=True,
            ),
        ),
        "logprobs-text": (
            LOGPROBS,
            pb.LogProbsRequest(model="bare-lm", inputs=["some words here"]),
        ),
    }
    out = {}
    for key, (path, req) in reqs.items():
        resp = wire.typed[path](req, timeout=CALL_TIMEOUT)
        out[key] = resp.SerializeToString(deterministic=True)
    return out


def run_batches(
    wire: Wire, oracle: Oracle, daemon: ServeProcess, calls: list[tuple[str, Message | bytes]]
) -> None:
    outcomes = wire.send(calls)
    assert daemon.alive(), f"the daemon died:\n{daemon.log()[-3000:]}"
    verify(oracle, wire, calls, outcomes)


def finish(
    wire: Wire,
    daemon: ServeProcess,
    before: dict[str, bytes],
    path: str,
    start: dict[str, int],
    typed: int,
    raw: int,
    codes: set[str],
) -> None:
    """After a fuzz run: the counts, the codes it exercised, and the same answers to the
    same requests as before any fuzz."""
    assert wire.sent[path] - start.get(path, 0) >= typed, wire.sent
    assert wire.sent[path + ":raw"] - start.get(path + ":raw", 0) >= raw, wire.sent
    seen = {code for (p, code), n in wire.codes.items() if p == path and n}
    assert codes <= seen, seen
    assert daemon.alive()
    assert probe(wire) == before
    with open(f"/proc/{daemon.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    print(
        f"\n{path}: {wire.sent[path]} typed + {wire.sent[path + ':raw']} raw; "
        f"{ {c: n for (p, c), n in sorted(wire.codes.items()) if p == path} }; "
        f"daemon CPU so far {cpu:.1f}s, this process {time.process_time():.1f}s"
    )
    for (p, reason), n in sorted(wire.reasons.items()):
        if p == path:
            print(f"    {n:6d}  {reason}")


@pytest.mark.slow
def test_fuzz_embed(
    wire: Wire, oracle: Oracle, daemon: ServeProcess, before: dict[str, bytes]
) -> None:
    start = dict(wire.sent)

    @FUZZ
    @given(
        st.lists(embed_requests(), min_size=BATCH, max_size=BATCH),
        st.lists(raw_bytes(embed_requests()), min_size=RAW_PER_BATCH, max_size=RAW_PER_BATCH),
    )
    @example(
        [
            pb.EmbedRequest(model="bare-emb", inputs=[" "]),
            pb.EmbedRequest(model="bare-emb", inputs=["x", "\u0301"], truncate=True),
            pb.EmbedRequest(model="emb", inputs=["\x00" * 300_000]),
        ],
        [b"\x12\x02\xc3\x28"],
    )
    def fuzz(typed: list[pb.EmbedRequest], raw: list[bytes]) -> None:
        run_batches(wire, oracle, daemon, [(EMBED, r) for r in typed] + [(EMBED, b) for b in raw])

    fuzz()
    finish(
        wire,
        daemon,
        before,
        EMBED,
        start,
        PER_RPC,
        2000,
        {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"},
    )


@pytest.mark.slow
def test_fuzz_logprobs(
    wire: Wire, oracle: Oracle, daemon: ServeProcess, before: dict[str, bytes]
) -> None:
    start = dict(wire.sent)

    @FUZZ
    @given(
        st.lists(logprobs_requests(), min_size=BATCH, max_size=BATCH),
        st.lists(raw_bytes(logprobs_requests()), min_size=RAW_PER_BATCH, max_size=RAW_PER_BATCH),
    )
    @example(
        [
            pb.LogProbsRequest(model="bare-lm", inputs=["\u200b"]),
            pb.LogProbsRequest(model="lm", token_ids=[pb.TokenIds(ids=[2**31 - 1])]),
            pb.LogProbsRequest(
                model="lm",
                token_ids=[pb.TokenIds(ids=[5])],
                top_k=20,
                entropy=True,
                expected_logprob=True,
                rank=True,
            ),
            pb.LogProbsRequest(model="lm", inputs=["x"], top_k=2**32 - 1),
        ],
        [b"\x1a\x05\x0a\x03\xff\xff\xff", b"\x20\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"],
    )
    def fuzz(typed: list[pb.LogProbsRequest], raw: list[bytes]) -> None:
        run_batches(
            wire, oracle, daemon, [(LOGPROBS, r) for r in typed] + [(LOGPROBS, b) for b in raw]
        )

    fuzz()
    finish(
        wire,
        daemon,
        before,
        LOGPROBS,
        start,
        PER_RPC,
        2000,
        {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"},
    )


@pytest.mark.slow
def test_fuzz_list_models(
    wire: Wire, oracle: Oracle, daemon: ServeProcess, before: dict[str, bytes]
) -> None:
    """ListModelsRequest has no fields: the fuzz is in the bytes (unknown fields of every
    wire type are legal protobuf and ignored; broken encodings are INVALID_ARGUMENT)."""
    start = dict(wire.sent)

    @FUZZ
    @given(
        st.lists(raw_bytes(st.just(pb.ListModelsRequest())), min_size=BATCH - 5, max_size=BATCH - 5)
    )
    def fuzz(raw: list[bytes]) -> None:
        typed: list[tuple[str, Message | bytes]] = [(LIST, pb.ListModelsRequest())] * 5
        run_batches(wire, oracle, daemon, typed + [(LIST, b) for b in raw])

    fuzz()
    finish(
        wire,
        daemon,
        before,
        LIST,
        start,
        5 * EXAMPLES,
        PER_RPC - 5 * EXAMPLES,
        {"OK", "INVALID_ARGUMENT"},
    )
    assert wire.codes[(LIST, "OK")] > 1000 and wire.codes[(LIST, "INVALID_ARGUMENT")] > 1000


@pytest.mark.slow
def test_fuzz_health_check(
    wire: Wire, oracle: Oracle, daemon: ServeProcess, before: dict[str, bytes]
) -> None:
    start = dict(wire.sent)

    @FUZZ
    @given(
        st.lists(health_requests(), min_size=BATCH, max_size=BATCH),
        st.lists(raw_bytes(health_requests()), min_size=RAW_PER_BATCH, max_size=RAW_PER_BATCH),
    )
    def fuzz(typed: list[health_pb2.HealthCheckRequest], raw: list[bytes]) -> None:
        run_batches(wire, oracle, daemon, [(CHECK, r) for r in typed] + [(CHECK, b) for b in raw])

    fuzz()
    finish(
        wire, daemon, before, CHECK, start, PER_RPC, 2000, {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}
    )
