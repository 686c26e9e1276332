from esm2_service.esm2.v1 import esm2_pb2 as _esm2_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_ENCODE: _ClassVar[Task]
    TASK_PREDICT: _ClassVar[Task]
TASK_UNSPECIFIED: Task
TASK_ENCODE: Task
TASK_PREDICT: Task

class QueueItem(_message.Message):
    __slots__ = ("request_id", "sequence_index", "task", "sequence", "repr_layers", "include", "dtype", "deadline_unix_s", "enqueued_unix_s", "news_stream")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REPR_LAYERS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ENQUEUED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    NEWS_STREAM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sequence_index: int
    task: Task
    sequence: str
    repr_layers: _containers.RepeatedScalarFieldContainer[int]
    include: _containers.RepeatedScalarFieldContainer[_esm2_pb2.Include]
    dtype: _esm2_pb2.Dtype
    deadline_unix_s: float
    enqueued_unix_s: float
    news_stream: str
    def __init__(self, request_id: _Optional[str] = ..., sequence_index: _Optional[int] = ..., task: _Optional[_Union[Task, str]] = ..., sequence: _Optional[str] = ..., repr_layers: _Optional[_Iterable[int]] = ..., include: _Optional[_Iterable[_Union[_esm2_pb2.Include, str]]] = ..., dtype: _Optional[_Union[_esm2_pb2.Dtype, str]] = ..., deadline_unix_s: _Optional[float] = ..., enqueued_unix_s: _Optional[float] = ..., news_stream: _Optional[str] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("sequence_index", "code", "message")
    SEQUENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    sequence_index: int
    code: str
    message: str
    def __init__(self, sequence_index: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
