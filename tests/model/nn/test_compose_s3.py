"""Pretrained parts and omni checkpoints from s3:// (a real S3 server, SeaweedFS): the CLI composes
from s3 sources into s3, equal to a local compose; data prep tokenises with the S3 LLM's own
tokenizer; init-model continues from an omni checkpoint on s3."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from components.config import load_config
from components.steps.training import init_model
from model.data.prep import prepare
from model.nn.compose import compose
from model.nn.omni import OmniModel
from model.storage import S3Store
from model.text.tokenizer import load_tokenizer
from pipelines.cli import main
from tests.hf_parts import make_parts
from tests.model.data.test_prep_s3 import raw  # noqa: F401 - a small corpus fixture
from tests.model.nn.test_compose import model_cfg
from tests.s3_server import S3Server, s3_server_fixture

s3_server = s3_server_fixture()


@pytest.fixture()
def s3_parts(s3_server: S3Server, monkeypatch, tmp_path):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    local = make_parts(tmp_path / "parts")
    for part, folder in local.items():
        S3Store(bucket, f"models/{part}", s3_server.config()).upload_dir(folder)
    return bucket, local, {p: f"s3://{bucket}/models/{p}" for p in local}


def test_compose_from_s3_into_s3_equals_the_local_compose(s3_parts, s3_server, tmp_path, capsys):
    bucket, local, remote = s3_parts
    args = [a for p, uri in remote.items() for a in (f"--{p}", uri)]
    assert main(["model", "compose", *args, "--out", f"s3://{bucket}/omni/ckpt", "model=hf"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["llm"]["source"] == remote["llm"] and counts["vision"]["tensors_loaded"] > 0
    S3Store(bucket, "omni/ckpt", s3_server.config()).download_dir("", tmp_path / "from-s3")
    compose(model_cfg(**local), tmp_path / "local")
    a, b = (OmniModel.from_pretrained(tmp_path / d).state_dict() for d in ("from-s3", "local"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prep_tokenises_with_the_s3_llms_tokenizer_and_init_model_continues_from_s3(
        s3_parts, s3_server, raw, tmp_path):  # noqa: F811
    bucket, local, remote = s3_parts
    cfg = load_config([f"model.init.llm={remote['llm']}"])  # model=tiny: its YAML matches the tiny parts
    prepare([raw], tmp_path / "prepared", cfg.data, cfg.model, progress=False)
    ours, theirs = load_tokenizer(tmp_path / "prepared" / "tokenizer"), load_tokenizer(local["llm"])
    assert ours.get_vocab() == theirs.get_vocab() and ours.chat_template == theirs.chat_template
    compose(model_cfg(**local), tmp_path / "ckpt")
    S3Store(bucket, "omni/start", s3_server.config()).upload_dir(tmp_path / "ckpt")
    resumed = load_config([f"model.pretrained=s3://{bucket}/omni/start", "model=hf"])
    init_model(resumed, tmp_path / "prepared", tmp_path / "init")
    a, b = (OmniModel.from_pretrained(tmp_path / d).state_dict() for d in ("init", "ckpt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
