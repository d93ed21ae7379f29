from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetLearnerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LearnerStatus(_message.Message):
    __slots__ = ("policy_version", "optimizer_step", "kl_coef", "last_checkpoint", "samples_trained", "replicas", "max_iterations", "finished", "max_policy_lag", "policy_lag_mean", "stale_dropped", "buffer_depth", "outstanding")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEP_FIELD_NUMBER: _ClassVar[int]
    KL_COEF_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TRAINED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    MAX_POLICY_LAG_FIELD_NUMBER: _ClassVar[int]
    POLICY_LAG_MEAN_FIELD_NUMBER: _ClassVar[int]
    STALE_DROPPED_FIELD_NUMBER: _ClassVar[int]
    BUFFER_DEPTH_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    optimizer_step: int
    kl_coef: float
    last_checkpoint: str
    samples_trained: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    max_iterations: int
    finished: bool
    max_policy_lag: int
    policy_lag_mean: float
    stale_dropped: int
    buffer_depth: int
    outstanding: int
    def __init__(self, policy_version: _Optional[int] = ..., optimizer_step: _Optional[int] = ..., kl_coef: _Optional[float] = ..., last_checkpoint: _Optional[str] = ..., samples_trained: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., max_iterations: _Optional[int] = ..., finished: _Optional[bool] = ..., max_policy_lag: _Optional[int] = ..., policy_lag_mean: _Optional[float] = ..., stale_dropped: _Optional[int] = ..., buffer_depth: _Optional[int] = ..., outstanding: _Optional[int] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("replica_id", "address", "policy_version", "failed_syncs")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAILED_SYNCS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    address: str
    policy_version: int
    failed_syncs: int
    def __init__(self, replica_id: _Optional[str] = ..., address: _Optional[str] = ..., policy_version: _Optional[int] = ..., failed_syncs: _Optional[int] = ...) -> None: ...

class RegisterRolloutRequest(_message.Message):
    __slots__ = ("replica_id", "address", "policy_version")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    address: str
    policy_version: int
    def __init__(self, replica_id: _Optional[str] = ..., address: _Optional[str] = ..., policy_version: _Optional[int] = ...) -> None: ...

class RegisterRolloutResponse(_message.Message):
    __slots__ = ("policy_version", "accepted")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    accepted: bool
    def __init__(self, policy_version: _Optional[int] = ..., accepted: _Optional[bool] = ...) -> None: ...

class UnregisterRolloutRequest(_message.Message):
    __slots__ = ("replica_id",)
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    def __init__(self, replica_id: _Optional[str] = ...) -> None: ...

class UnregisterRolloutResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("path", "optimizer_step")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEP_FIELD_NUMBER: _ClassVar[int]
    path: str
    optimizer_step: int
    def __init__(self, path: _Optional[str] = ..., optimizer_step: _Optional[int] = ...) -> None: ...
