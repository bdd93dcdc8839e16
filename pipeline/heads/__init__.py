"""Temporal heads over cached features. Importing this package registers every head family in
``pipeline.registry.HEADS`` (timm-style: one file per family, explicit imports, no discovery)."""

from pipeline.heads import (  # noqa: F401  (imported for registration)
    two_stream,
    lstm,
    temporal_pool,
    temporal_conv,
    ng_pooling,
    deep_lstm,
    karpathy_fusion,
    fusion_net,
    stream_lstm,
)
from pipeline import baselines  # noqa: F401,E402  (kernel baselines: svm, svm-ef, svm-lf, svm-mkl)
from pipeline.heads.base import Head  # noqa: F401
from pipeline.registry import HEADS  # noqa: F401
