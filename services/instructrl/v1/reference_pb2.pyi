from instructrl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogProbsItem(_message.Message):
    __slots__ = ("token_ids", "response_start")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_START_FIELD_NUMBER: _ClassVar[int]
    token_ids: _common_pb2.Tensor
    response_start: int
    def __init__(self, token_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., response_start: _Optional[int] = ...) -> None: ...

class LogProbsRequest(_message.Message):
    __slots__ = ("items", "temperature")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[LogProbsItem]
    temperature: float
    def __init__(self, items: _Optional[_Iterable[_Union[LogProbsItem, _Mapping]]] = ..., temperature: _Optional[float] = ...) -> None: ...

class LogProbsResult(_message.Message):
    __slots__ = ("logprobs",)
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _common_pb2.Tensor
    def __init__(self, logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class LogProbsResponse(_message.Message):
    __slots__ = ("results", "model")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[LogProbsResult]
    model: str
    def __init__(self, results: _Optional[_Iterable[_Union[LogProbsResult, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...
