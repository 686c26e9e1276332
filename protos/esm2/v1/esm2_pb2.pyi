from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Include(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INCLUDE_UNSPECIFIED: _ClassVar[Include]
    INCLUDE_MEAN: _ClassVar[Include]
    INCLUDE_PER_TOKEN: _ClassVar[Include]
    INCLUDE_BOS: _ClassVar[Include]
    INCLUDE_CONTACTS: _ClassVar[Include]
    INCLUDE_LOGITS: _ClassVar[Include]
    INCLUDE_ATTENTIONS: _ClassVar[Include]

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]

class ScoringStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORING_STRATEGY_UNSPECIFIED: _ClassVar[ScoringStrategy]
    SCORING_STRATEGY_MASKED_MARGINAL: _ClassVar[ScoringStrategy]
    SCORING_STRATEGY_WT_MARGINAL: _ClassVar[ScoringStrategy]
    SCORING_STRATEGY_PSEUDO_LOG_LIKELIHOOD: _ClassVar[ScoringStrategy]
INCLUDE_UNSPECIFIED: Include
INCLUDE_MEAN: Include
INCLUDE_PER_TOKEN: Include
INCLUDE_BOS: Include
INCLUDE_CONTACTS: Include
INCLUDE_LOGITS: Include
INCLUDE_ATTENTIONS: Include
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
SCORING_STRATEGY_UNSPECIFIED: ScoringStrategy
SCORING_STRATEGY_MASKED_MARGINAL: ScoringStrategy
SCORING_STRATEGY_WT_MARGINAL: ScoringStrategy
SCORING_STRATEGY_PSEUDO_LOG_LIKELIHOOD: ScoringStrategy

class Item(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: str
    def __init__(self, sequence: _Optional[str] = ...) -> None: ...

class EncodeParams(_message.Message):
    __slots__ = ("repr_layers", "include", "dtype")
    REPR_LAYERS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    repr_layers: _containers.RepeatedScalarFieldContainer[int]
    include: _containers.RepeatedScalarFieldContainer[Include]
    dtype: Dtype
    def __init__(self, repr_layers: _Optional[_Iterable[int]] = ..., include: _Optional[_Iterable[_Union[Include, str]]] = ..., dtype: _Optional[_Union[Dtype, str]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("items", "params")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    params: EncodeParams
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., params: _Optional[_Union[EncodeParams, _Mapping]] = ...) -> None: ...

class PredictParams(_message.Message):
    __slots__ = ("dtype",)
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    dtype: Dtype
    def __init__(self, dtype: _Optional[_Union[Dtype, str]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("items", "params")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    params: PredictParams
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., params: _Optional[_Union[PredictParams, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("kind", "layer", "tensor", "offset")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    kind: Include
    layer: int
    tensor: Tensor
    offset: int
    def __init__(self, kind: _Optional[_Union[Include, str]] = ..., layer: _Optional[int] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class ItemComplete(_message.Message):
    __slots__ = ("vocab_tokens", "sequence_tokens", "model")
    VOCAB_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    vocab_tokens: _containers.RepeatedScalarFieldContainer[str]
    sequence_tokens: _containers.RepeatedScalarFieldContainer[str]
    model: ModelInfo
    def __init__(self, vocab_tokens: _Optional[_Iterable[str]] = ..., sequence_tokens: _Optional[_Iterable[str]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("sequence_index", "chunk", "complete")
    SEQUENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    sequence_index: int
    chunk: TensorChunk
    complete: ItemComplete
    def __init__(self, sequence_index: _Optional[int] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., complete: _Optional[_Union[ItemComplete, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("sequence_index", "chunk", "complete")
    SEQUENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    sequence_index: int
    chunk: TensorChunk
    complete: ItemComplete
    def __init__(self, sequence_index: _Optional[int] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., complete: _Optional[_Union[ItemComplete, _Mapping]] = ...) -> None: ...

class EncodePackedRequest(_message.Message):
    __slots__ = ("items", "params")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    params: EncodeParams
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., params: _Optional[_Union[EncodeParams, _Mapping]] = ...) -> None: ...

class EncodePackedResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[EncodeResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[EncodeResponse, _Mapping]]] = ...) -> None: ...

class PredictPackedRequest(_message.Message):
    __slots__ = ("items", "params")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    params: PredictParams
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., params: _Optional[_Union[PredictParams, _Mapping]] = ...) -> None: ...

class PredictPackedResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[PredictResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[PredictResponse, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "checkpoint_sha256", "random_weights", "device", "precision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    checkpoint_sha256: str
    random_weights: bool
    device: str
    precision: str
    def __init__(self, name: _Optional[str] = ..., checkpoint_sha256: _Optional[str] = ..., random_weights: _Optional[bool] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("wild_type", "variants", "scan", "strategies")
    WILD_TYPE_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    SCAN_FIELD_NUMBER: _ClassVar[int]
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    wild_type: str
    variants: _containers.RepeatedScalarFieldContainer[str]
    scan: bool
    strategies: _containers.RepeatedScalarFieldContainer[ScoringStrategy]
    def __init__(self, wild_type: _Optional[str] = ..., variants: _Optional[_Iterable[str]] = ..., scan: _Optional[bool] = ..., strategies: _Optional[_Iterable[_Union[ScoringStrategy, str]]] = ...) -> None: ...

class VariantScores(_message.Message):
    __slots__ = ("strategy", "variant_indices", "mutants", "scores")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    VARIANT_INDICES_FIELD_NUMBER: _ClassVar[int]
    MUTANTS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    strategy: ScoringStrategy
    variant_indices: _containers.RepeatedScalarFieldContainer[int]
    mutants: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, strategy: _Optional[_Union[ScoringStrategy, str]] = ..., variant_indices: _Optional[_Iterable[int]] = ..., mutants: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class PositionLogProbs(_message.Message):
    __slots__ = ("strategy", "positions", "log_probs")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    strategy: ScoringStrategy
    positions: _containers.RepeatedScalarFieldContainer[int]
    log_probs: Tensor
    def __init__(self, strategy: _Optional[_Union[ScoringStrategy, str]] = ..., positions: _Optional[_Iterable[int]] = ..., log_probs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ScoreComplete(_message.Message):
    __slots__ = ("strategies", "amino_acids", "variant_count", "forward_passes", "model")
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    AMINO_ACIDS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_COUNT_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    strategies: _containers.RepeatedScalarFieldContainer[ScoringStrategy]
    amino_acids: str
    variant_count: int
    forward_passes: int
    model: ModelInfo
    def __init__(self, strategies: _Optional[_Iterable[_Union[ScoringStrategy, str]]] = ..., amino_acids: _Optional[str] = ..., variant_count: _Optional[int] = ..., forward_passes: _Optional[int] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "log_probs", "complete")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    scores: VariantScores
    log_probs: PositionLogProbs
    complete: ScoreComplete
    def __init__(self, scores: _Optional[_Union[VariantScores, _Mapping]] = ..., log_probs: _Optional[_Union[PositionLogProbs, _Mapping]] = ..., complete: _Optional[_Union[ScoreComplete, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "model", "last_seen_unix_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model: ModelInfo
    last_seen_unix_s: float
    def __init__(self, worker_id: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., last_seen_unix_s: _Optional[float] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("workers", "queue_depth", "any_random_weights")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    ANY_RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    queue_depth: int
    any_random_weights: bool
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., queue_depth: _Optional[int] = ..., any_random_weights: _Optional[bool] = ...) -> None: ...
