import pytest

from components.config import ConfigError, load_config
from components.stages import STAGES


def test_default_tree_validates_and_has_every_stage_in_dag_order():
    cfg = load_config()
    assert [s.name for s in cfg.ordered_stages()] == list(STAGES)
    assert cfg.model.name == "tiny"


def test_paper_size_model_is_selectable():
    cfg = load_config(["model=omni-7b"])
    assert cfg.model.llm.hidden_size == 3584 and cfg.model.vision.image_size == 384


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.sft.lr=-1", "stages.sft.lr"),
        ("stages.sft.trainable=[brain]", "unknown module 'brain'"),
        ("model.llm.num_attention_heads=3", "divisible"),
        ("model.audio.projector_stride=3", "model.audio.projector_stride"),
        ("promotion.max_regression=-0.1", "promotion.max_regression"),
        ("+run.bogus=1", "run.bogus"),
        ("cluster.endpoint.container_concurrency=4", "under serving.batching.max_batch_size=8"),
        ("serving.batching.prefill_chunk=0", "serving.batching.prefill_chunk: Input should be greater than 0"),
        ("serving.batching.max_context=256", "batching.max_context .256. must exceed limits.max_tokens .512."),
        ("serving.batching.cuda_graph=true", "serving.batching.cuda_graph: Extra inputs"),
    ],
)
def test_bad_values_fail_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config([override])


def test_unknown_key_fails_naming_it_and_a_schema_default_can_be_overridden():
    with pytest.raises(ConfigError, match=r"run\.bogus: Extra inputs are not permitted"):
        load_config(["run.bogus=1"])
    # A field the YAML tree does not spell out (its default lives in the schema) is still a plain override.
    assert load_config(["model.loss_chunk_tokens=5"]).model.loss_chunk_tokens == 5
    assert load_config(["model=omni-7b"]).model.name == "omni-7b"  # a group choice stays a group choice
