"""Stage-two additions over the common trainer: clip-level Hit@k (Karpathy heads) and network expansion
(``--init-from``, Ng et al. 3.3) through the stage, on the synthetic UCF101-layout dataset of test_training."""

import dataclasses

import numpy as np
import pytest
from safetensors.torch import load_file

import pipeline.heads  # noqa: F401
import stages.train as st
from pipeline.errors import UserError
from tests.synthetic import write_ucf_store


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_ucf_store(tmp_path_factory.mktemp("ds"), ["Alpha", "Beta", "Gamma"], T=(8, 15), frame_step=3)


def _job(dataset, tmp_path, head, *sets, **kw):
    root, store = dataset
    return st.TrainJob(store=str(store), dataset=str(root), head=head, streams=("rgb",),
                       overrides=tuple(tuple(s.split("=", 1)) for s in sets), out=str(tmp_path / "runs"), **kw)


def test_clip_and_video_hit_at_k_side_by_side(dataset, tmp_path):
    job = _job(dataset, tmp_path, "single-frame", "epochs=8", "patience=8", "fc_dim=16", "tower_dims=16,16,16",
               "num_clips=3", "optimizer=adam", "lr=3e-2", "dropout=0", "batch_size=8")
    job = dataclasses.replace(job, fusion_fold=0.0)  # the tiny set keeps every training video (no score fusion here)
    m = st.train(job, progress=False, echo=lambda _: None).metrics
    assert m["clip"]["n_clips"] == 3 * m["n_test"]  # every evaluation clip scored on its own
    # 3 classes (chance 1/3), readable from any single frame; a video averages 3 clips (Karpathy 4.1)
    assert m["clip"]["hit@1"] >= 0.6 and m["hit@1"] >= 0.75, (m["clip"], m["hit@1"])


def test_init_from_copies_the_trained_weights(dataset, tmp_path):
    small = st.train(_job(dataset, tmp_path, "late-pool", "epochs=1", "hidden=16", "frames=1"),
                     progress=False, echo=lambda _: None)
    msgs = []
    big_job = _job(dataset, tmp_path, "late-pool", "epochs=0", "hidden=16", "frames=8", init_from=str(small.path))
    big = st.train(big_job, progress=False, echo=msgs.append)
    assert any("initialised" in m for m in msgs)
    a, b = load_file(str(small.path / "weights.safetensors")), load_file(str(big.path / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # epochs=0: the expanded model is exactly the one loaded
        assert np.array_equal(a[k].numpy(), b[k].numpy()), k
    with pytest.raises(UserError, match="do not fit"):
        st.train(_job(dataset, tmp_path, "late-pool", "epochs=0", "hidden=8", init_from=str(small.path)),
                 progress=False, echo=lambda _: None)
