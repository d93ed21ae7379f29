from instructrl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Experience(_message.Message):
    __slots__ = ("sample_id", "prompt_id", "prompt_token_ids", "response_token_ids", "finish_reason", "sampling_logprobs", "policy_version", "temperature", "ref_logprobs", "score", "raw_score", "run_id", "replica_id", "created_unix_ms", "timings", "sample_index", "epoch")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    REF_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    prompt_id: str
    prompt_token_ids: _common_pb2.Tensor
    response_token_ids: _common_pb2.Tensor
    finish_reason: str
    sampling_logprobs: _common_pb2.Tensor
    policy_version: int
    temperature: float
    ref_logprobs: _common_pb2.Tensor
    score: float
    raw_score: float
    run_id: str
    replica_id: str
    created_unix_ms: int
    timings: _common_pb2.Timings
    sample_index: int
    epoch: int
    def __init__(self, sample_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., response_token_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., finish_reason: _Optional[str] = ..., sampling_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., policy_version: _Optional[int] = ..., temperature: _Optional[float] = ..., ref_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., score: _Optional[float] = ..., raw_score: _Optional[float] = ..., run_id: _Optional[str] = ..., replica_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., sample_index: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class PromptRecord(_message.Message):
    __slots__ = ("prompt_id", "prompt", "epoch", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    prompt: _common_pb2.Sequence
    epoch: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, prompt_id: _Optional[str] = ..., prompt: _Optional[_Union[_common_pb2.Sequence, _Mapping]] = ..., epoch: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
