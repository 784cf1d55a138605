"""Pipelines: parsing, YAML, parameters, input checks, fingerprints, user ops by import path."""

from __future__ import annotations

import pytest

from daskmv.errors import PipelineError
from daskmv.ops import REGISTRY, Op, Output, register_op
from daskmv.pipeline import Pipeline, register_pipeline


def test_comma_list_and_defaults():
    p = Pipeline.parse("decode, resize,stats")
    assert [op.name for op in p.ops] == ["decode", "resize", "stats"]
    assert p.ops[1].config == {"size": [224, 224], "interpolation": "area"}
    assert p.loader_inputs == {"image", "image_info"}
    assert "resized_path" in p.output_columns and "sharpness" in p.output_columns


def test_yaml_pipeline_with_params_and_relative_files(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net.pt").write_bytes(b"not loaded while parsing")
    (tmp_path / "p.yaml").write_text(
        "name: small\n"
        "steps:\n"
        "  - resize: {size: [64, 32], interpolation: linear}\n"
        "  - stats\n"
        "  - op: torch_model\n"
        "    params: {model: models/net.pt, size: 32, output: emb}\n"
    )
    p = Pipeline.parse(str(tmp_path / "p.yaml"))
    assert p.name == "small"
    assert p.ops[0].config == {"size": [64, 32], "interpolation": "linear"}
    assert p.ops[2].config["model"] == str(tmp_path / "models" / "net.pt")
    assert [o.column for o in p.array_outputs] == ["resized_path", "emb_path"]
    round_trip = Pipeline.from_steps(p.steps())
    assert round_trip.fingerprint == p.fingerprint


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resize,blur", "unknown op 'blur'"),
        ([{"resize": {"sise": 3}}], "has no parameter sise"),
        ([{"resize": {"interpolation": "magic"}}], "is not one of"),
        ([{"resize": {"size": "big"}}], "size must be an integer or a list"),
        ([{"resize": {"size": True}}], "size must be an integer or a list, not True"),
        ([{"albedo": {"low": "a"}}], "low must be a number, not 'a'"),
        ([{"albedo": {"scales": ["x"]}}], "bad parameter .*could not convert"),
        ([{"composite": {"edge_erode": 1.5}}], "edge_erode must be an integer"),
        ([{"degrade": {"seed": "7"}}], "seed must be an integer"),
        ("", "empty pipeline"),
        ([{"op": "resize", "params": {}, "extra": 1}], "unknown key"),
        ("resize,resize", "both write"),
        ("torch_model", "needs model="),
        ("nosuchmodule:Op", "cannot import op"),
        ("daskmv.pipeline:Pipeline", "is not an Op subclass"),
    ],
)
def test_bad_pipelines_are_clear_errors(spec, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline.parse(spec)


def test_yaml_errors(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        Pipeline.parse(str(tmp_path / "absent.yaml"))
    (tmp_path / "bad.yaml").write_text("steps: [resize\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        Pipeline.parse(str(tmp_path / "bad.yaml"))
    (tmp_path / "nosteps.yaml").write_text("name: x\n")
    with pytest.raises(PipelineError, match="needs a list under 'steps:'"):
        Pipeline.parse(str(tmp_path / "nosteps.yaml"))


def test_inputs_are_checked_against_the_manifest():
    p = Pipeline.parse("resize,stats")
    assert p.validate(["path", "label"]) == []
    with pytest.raises(PipelineError, match="reads files but the manifest has no column 'path'"):
        p.validate(["file"])
    assert p.validate(["file"], path_column="file") == []
    flaky = Pipeline.parse("testops:Flaky")
    with pytest.raises(PipelineError, match="needs input 'label'"):
        flaky.validate(["path"])
    assert Pipeline.parse("resize,stats").validate(["path", "mean_r", "status"]) == ["mean_r", "status"]


def test_later_ops_may_read_earlier_outputs():
    class UsesResized(Op):
        name = "uses_resized"
        inputs = ("resized",)
        outputs = (Output("h", "column", "int64"),)

        def process(self, rows):
            return [{"h": row["resized"].shape[0]} for row in rows]

    p = Pipeline([REGISTRY["resize"](), UsesResized()])
    p.validate(["path"])
    with pytest.raises(PipelineError, match="needs input 'resized'"):
        Pipeline([UsesResized(), REGISTRY["resize"]()]).validate(["path"])


def test_fingerprint_follows_parameters_and_versions():
    base = Pipeline.parse("resize,stats").fingerprint
    assert Pipeline.parse("resize,stats").fingerprint == base
    assert Pipeline.parse([{"resize": {"size": 128}}, "stats"]).fingerprint != base
    assert Pipeline.parse("stats,resize").fingerprint != base


def test_user_ops_by_import_path_and_registration():
    p = Pipeline.parse("testops:Flaky")
    assert p.ops[0].name == "testops:Flaky"

    @register_op
    class Shout(Op):
        name = "shout_for_test"
        inputs = ("label",)
        outputs = (Output("loud", "column", "string"),)

        def process(self, rows):
            return [{"loud": str(row["label"]).upper()} for row in rows]

    try:
        assert Pipeline.parse("shout_for_test").ops[0].name == "shout_for_test"
    finally:
        REGISTRY.pop("shout_for_test")


def test_named_pipelines_expand():
    register_pipeline("quicklook_for_test", [{"op": "resize", "params": {"size": 32}}, {"op": "stats"}])
    p = Pipeline.parse("quicklook_for_test")
    assert [op.name for op in p.ops] == ["resize", "stats"]
    assert p.ops[0].config["size"] == [32, 32]
    assert p.name == "quicklook_for_test"


def test_auto_partition_rows_follow_threads_memory_and_caps():
    from daskmv.engine import MAX_COLUMN_PARTITION_ROWS, MAX_PARTITION_ROWS, auto_partition_rows

    assert auto_partition_rows(300, 2) == 19  # about 8 partitions per thread
    assert auto_partition_rows(10, 2) == 16  # never tiny
    assert auto_partition_rows(10**6, 2) == MAX_PARTITION_ROWS
    assert auto_partition_rows(10**7, 2, reads_files=False) == MAX_COLUMN_PARTITION_ROWS
    big = Pipeline.parse([{"resize": {"size": 2048}}]).row_bytes  # 12 MB a row
    assert auto_partition_rows(10**6, 2, row_bytes=big) == (256 << 20) // big
    assert Pipeline.parse([{"resize": {"size": [64, 32]}}, "stats"]).row_bytes == 64 * 32 * 3
