"""Run config: YAML + dotted overrides -> typed frozen dataclasses; bad values name their key."""

from pathlib import Path

import pytest
import yaml

from flowssm.solvers import Signature
from flowssm.train import config as C

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path):
    cfg = C.load(path)
    assert C.from_dict(C.RunConfig, yaml.safe_load(C.dump(cfg))) == cfg


def test_defaults_and_overrides_are_typed():
    cfg = C.load(None, ["train.steps=7", "optim.lr=1e-3", "model.mixer.solver=signature", "model.mixer.solver.depth=3",
                        "model.mixer.allow_neg_eigval=true", "model.mlp_hidden=null"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.model.mixer.solver == Signature(depth=3)  # built (and validated) once, at load
    assert C.to_dict(cfg)["model"]["mixer"]["solver"] == {"name": "signature", "depth": 3}
    assert cfg.model.mixer.allow_neg_eigval is True and cfg.model.mlp_hidden is None
    assert cfg.train.batch_size == C.TrainConfig().batch_size  # untouched fields keep defaults


def test_kernel_choices_load_typed_and_round_trip():
    cfg = C.load(None, ["model.mixer.family=kda", "model.mixer.kernels.score_mode=tf32",
                        "model.mixer.kernels.transfer_warps=8", "model.mixer.kernels.transfer_mode=f16"])
    assert cfg.model.mixer.kernels.changes() == {"score_mode": "tf32", "transfer_warps": 8, "transfer_mode": "f16"}
    assert C.from_dict(C.RunConfig, yaml.safe_load(C.dump(cfg))) == cfg


def test_int_is_accepted_for_float_fields():
    assert C.load(None, ["optim.grad_clip=2"]).optim.grad_clip == 2.0


BAD = [
    (["modle.d_model=3"], "modle"),
    (["model.mixer.solvr=exact"], "model.mixer.solvr"),
    (["train.steps=ten"], "train.steps"),
    (["train.batch_size=true"], "train.batch_size"),
    (["model.dtype=float16"], "model.dtype"),
    (["train.dtype=bfloat16"], "train.dtype: moved to model.dtype"),
    (["model.remat=1"], "model.remat"),
    (["model.mixer.backend=cuda"], "model.mixer.backend"),
    # the kernels' choices: their fields and values, and where they cannot apply
    (["model.mixer.kernels.score_mode=bf17"], "model.mixer.kernels.score_mode"),
    (["model.mixer.kernels.warps=8"], "model.mixer.kernels.warps"),
    (["model.mixer.kernels.transfer_warps=3"], "model.mixer.kernels.transfer_warps"),
    (["model.mixer.kernels.output=inline"], "model.mixer.kernels.output"),
    (["model.mixer.kernels.transfer_mode=fp8"], "model.mixer.kernels.transfer_mode"),
    (["model.mixer.kernels.score_mode=f16"], "model.mixer.kernels.score_mode"),
    (["model.mixer.family=rwkv7", "model.mixer.kernels.score_mode=tf32"], "model.mixer.kernels"),
    (["model.mixer.backend=xla", "model.mixer.kernels.score_mode=tf32"], "model.mixer.kernels"),
    # what a backend cannot run is refused at load time, naming the keys
    (["model.mixer.backend=pallas", "model.mixer.solver=logode"], "model.mixer.solver"),
    (["model.mixer.backend=pallas", "model.mixer.semantics=continuous"], "model.mixer.semantics"),
    (["model.mixer.backend=pallas", "model.mixer.chunk_size=24"], "model.mixer.chunk_size"),
    (["model.mixer.backend=pallas", "model.mixer.chunk_size=8"], "model.mixer.chunk_size"),
    (["model.mixer.solver=logode", "model.mixer.allow_neg_eigval=true"], "model.mixer.solver, model.mixer.allow_neg_eigval"),
    (["data.task=copy"], "data.task"),
    (["data.corpus=wikipedia"], "data.corpus"),
    (["model.mixer.family=mamba"], "model.mixer.family"),
    (["model.mixer.solver=rk4"], "model.mixer.solver"),
    (["model.mixer.num_heads=3"], "model.mixer.num_heads"),
    (["model.mixer.allow_neg_eigval=yes please"], "model.mixer.allow_neg_eigval"),
    (["model.mixer.head_dim=wide"], "model.mixer.head_dim"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.b2=1.5"], "optim.b2"),
    (["data.seq_len=0"], "data.seq_len"),
    (["mesh.data=3"], "train.batch_size"),
    (["mesh.data=0"], "mesh.data"),
    (["model.vocab_size=100"], "model.vocab_size"),
    (["data.task=mqar", "data.num_queries=9"], "data.num_queries"),
    (["data.task=mqar", "data.seq_len=16"], "data.seq_len"),
    (["model=5"], "model"),
    (["train.steps.x=1"], "train.steps"),
    (["train.steps"], "train.steps"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[b[1] + ":" + b[0][-1] for b in BAD])
def test_bad_values_raise_naming_the_key(overrides, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")) as info:
        C.load(None, overrides)
    assert str(info.value).startswith(key)


def test_yaml_file_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 10\n  evl_every: 5\n")
    with pytest.raises(C.ConfigError, match=r"train\.evl_every: unknown key; allowed keys: \[.*'eval_every'"):
        C.load(path)
    path.write_text("- a list\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        C.load(path)
    with pytest.raises(C.ConfigError, match="no such config file"):
        C.load(tmp_path / "missing.yaml")


def test_config_is_frozen():
    cfg = C.load(None)
    with pytest.raises(AttributeError):
        cfg.train.steps = 3
