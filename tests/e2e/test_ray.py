"""The store build on datatrove's Ray executor, on a Ray started here (as a cluster's head would be):
the same stores as the local executor's."""

import json

import numpy as np
import pytest

ray = pytest.importorskip("ray")


def test_the_build_on_ray_makes_the_local_executors_stores(built_experiment, tmp_path):
    from dapt.data_mix.build import build_stores
    from dapt.data_mix.config import DataConfig
    from dapt.data_mix.store import TokenStore

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        manifests = build_stores(built_experiment.corpora, built_experiment.heldout, built_experiment.dedup,
                                 DataConfig(executor="ray", tasks=3), built_experiment.tokenizer_dir, tmp_path / "stores")
    finally:
        ray.shutdown()
    for manifest in manifests:
        name = manifest["corpus"]
        local = json.loads((built_experiment.stores_dir / name / "manifest.json").read_text())
        assert manifest["splits"] == local["splits"] and manifest["accounting"] == local["accounting"]
        for split in ("train", "heldout"):
            assert np.array_equal(np.asarray(TokenStore(tmp_path / "stores" / name, split).tokens),
                                  np.asarray(TokenStore(built_experiment.stores_dir / name, split).tokens))
