"""Temporal heads over cached features. Importing this package registers every head family in
``pipeline.registry.HEADS`` (timm-style: one file per family, explicit imports, no discovery)."""

from pipeline import baselines  # noqa: F401  (kernel baselines: svm, svm-ef, svm-lf, svm-mkl)
from pipeline.heads import (  # noqa: F401  (imported for registration)
    attention_pool,
    deep_lstm,
    fusion_net,
    karpathy_fusion,
    lstm,
    ng_pooling,
    stream_lstm,
    temporal_conv,
    temporal_pool,
    transformer,
    two_stream,
    vlad,
)
from pipeline.heads.base import Head  # noqa: F401
from pipeline.registry import HEADS  # noqa: F401
