from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedRequest(_message.Message):
    __slots__ = ("model", "inputs", "normalize", "truncate", "prompt_name", "token_ids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    normalize: bool
    truncate: bool
    prompt_name: str
    token_ids: _containers.RepeatedCompositeFieldContainer[TokenIds]
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., normalize: bool = ..., truncate: bool = ..., prompt_name: _Optional[str] = ..., token_ids: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "embeddings", "rows", "dims", "token_counts", "revision", "fingerprint")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    model: str
    embeddings: bytes
    rows: int
    dims: int
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    revision: str
    fingerprint: str
    def __init__(self, model: _Optional[str] = ..., embeddings: _Optional[bytes] = ..., rows: _Optional[int] = ..., dims: _Optional[int] = ..., token_counts: _Optional[_Iterable[int]] = ..., revision: _Optional[str] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class LogProbsRequest(_message.Message):
    __slots__ = ("model", "inputs", "token_ids", "top_k", "truncate", "entropy", "expected_logprob", "rank")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    token_ids: _containers.RepeatedCompositeFieldContainer[TokenIds]
    top_k: int
    truncate: bool
    entropy: bool
    expected_logprob: bool
    rank: bool
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., token_ids: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., top_k: _Optional[int] = ..., truncate: bool = ..., entropy: bool = ..., expected_logprob: bool = ..., rank: bool = ...) -> None: ...

class SequenceLogProbs(_message.Message):
    __slots__ = ("token_ids", "logprobs", "entropy", "expected_logprob", "logprob_variance", "rank", "top_k_ids", "top_k_logprobs", "num_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TOP_K_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: bytes
    logprobs: bytes
    entropy: bytes
    expected_logprob: bytes
    logprob_variance: bytes
    rank: bytes
    top_k_ids: bytes
    top_k_logprobs: bytes
    num_tokens: int
    def __init__(self, token_ids: _Optional[bytes] = ..., logprobs: _Optional[bytes] = ..., entropy: _Optional[bytes] = ..., expected_logprob: _Optional[bytes] = ..., logprob_variance: _Optional[bytes] = ..., rank: _Optional[bytes] = ..., top_k_ids: _Optional[bytes] = ..., top_k_logprobs: _Optional[bytes] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class LogProbsResponse(_message.Message):
    __slots__ = ("model", "sequences", "top_k", "revision", "fingerprint")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    model: str
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceLogProbs]
    top_k: int
    revision: str
    fingerprint: str
    def __init__(self, model: _Optional[str] = ..., sequences: _Optional[_Iterable[_Union[SequenceLogProbs, _Mapping]]] = ..., top_k: _Optional[int] = ..., revision: _Optional[str] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "state", "error", "task", "device", "dtype", "source", "revision", "fingerprint", "weight_bytes", "load_seconds", "max_length", "output_dims", "error_class", "load_failures", "next_retry_unix", "pending_update", "pooling", "normalize", "prompt_names", "default_prompt_name")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ModelStatus.State]
        PENDING: _ClassVar[ModelStatus.State]
        LOADING: _ClassVar[ModelStatus.State]
        READY: _ClassVar[ModelStatus.State]
        FAILED: _ClassVar[ModelStatus.State]
    STATE_UNSPECIFIED: ModelStatus.State
    PENDING: ModelStatus.State
    LOADING: ModelStatus.State
    READY: ModelStatus.State
    FAILED: ModelStatus.State
    class LoadSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIMS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FAILURES_FIELD_NUMBER: _ClassVar[int]
    NEXT_RETRY_UNIX_FIELD_NUMBER: _ClassVar[int]
    PENDING_UPDATE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAMES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: ModelStatus.State
    error: str
    task: str
    device: str
    dtype: str
    source: str
    revision: str
    fingerprint: str
    weight_bytes: int
    load_seconds: _containers.ScalarMap[str, float]
    max_length: int
    output_dims: int
    error_class: str
    load_failures: int
    next_retry_unix: float
    pending_update: str
    pooling: str
    normalize: bool
    prompt_names: _containers.RepeatedScalarFieldContainer[str]
    default_prompt_name: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[ModelStatus.State, str]] = ..., error: _Optional[str] = ..., task: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., source: _Optional[str] = ..., revision: _Optional[str] = ..., fingerprint: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., load_seconds: _Optional[_Mapping[str, float]] = ..., max_length: _Optional[int] = ..., output_dims: _Optional[int] = ..., error_class: _Optional[str] = ..., load_failures: _Optional[int] = ..., next_retry_unix: _Optional[float] = ..., pending_update: _Optional[str] = ..., pooling: _Optional[str] = ..., normalize: bool = ..., prompt_names: _Optional[_Iterable[str]] = ..., default_prompt_name: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "versions", "config_hash")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODELS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    versions: _containers.ScalarMap[str, str]
    config_hash: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., versions: _Optional[_Mapping[str, str]] = ..., config_hash: _Optional[str] = ...) -> None: ...
