"""Tag schemas: shipped vocabularies, user schemas from YAML, and one clear error per mistake."""

import pytest

from tagmoe_lit.tags import TagSchema, TagSchemaError, shipped_schemas


def test_official18_keeps_release_ids_and_level_grouping():
    schema = TagSchema.load("official18")
    assert schema.num_tags == 18
    assert schema.names[0] == "local editing" and schema.names[17] == "image generation"
    assert schema.level_of("object editing") == "type" and schema.level_of("face preservation") == "preservation"
    assert schema.encode(["local editing", "object editing", "background preservation"]) == [0, 6, 13]


def test_shipped_schemas_load_and_user_schema_from_file(tmp_path):
    assert {"official18", "synthtag"} <= set(shipped_schemas())
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nlevels:\n  scope: {generation: 0, editing: 1}\n  type: {recolor: 2}\n")
    schema = TagSchema.load(str(path))
    assert schema.names == ["generation", "editing", "recolor"]
    assert schema.multi_hot(schema.encode({"scope": ["editing"], "type": ["recolor"]})).tolist() == [0, 1, 1]
    assert schema.fingerprint != TagSchema.load("synthtag").fingerprint


@pytest.mark.parametrize(
    "body, message",
    [
        ("levels:\n  scope: {a: 0, b: 0}\n", r"id 0 is used by both 'a' and 'b'"),
        ("levels:\n  scope: {a: 0}\n  type: {a: 1}\n", r"tag 'a' appears in levels 'scope' and 'type'"),
        ("levels:\n  scope: {a: 0, b: 2}\n", r"without gaps; missing \[1\]"),
        ("levels:\n  scope: {a: zero}\n", r"tag 'a' has id 'zero'"),
        ("levels: {}\n", r"declares no levels"),
        ("name: x\nlevel: {}\n", r"expected a mapping with keys 'name' and 'levels'"),
        ("levels:\n  scope: {a: 0}\nrulez: 1\n", r"unknown keys \['rulez'\]"),
    ],
)
def test_broken_schema_files_name_the_file_and_the_problem(tmp_path, body, message):
    path = tmp_path / "broken.yaml"
    path.write_text(body)
    with pytest.raises(TagSchemaError, match=message) as err:
        TagSchema.load(str(path))
    assert "broken.yaml" in str(err.value)


def test_unknown_schema_tag_and_wrong_level_list_the_valid_choices():
    with pytest.raises(TagSchemaError, match=r"not found: pass one of \[.*'official18'.*\]"):
        TagSchema.load("nope")
    schema = TagSchema.load("official18")
    with pytest.raises(TagSchemaError, match=r"Unknown tag 'local edit' .* valid tags: \['local editing'"):
        schema.encode(["local edit"])
    with pytest.raises(TagSchemaError, match=r"filed under level 'scope' but .* puts it in 'type'; valid 'scope' tags"):
        schema.encode({"scope": ["object editing"]})
    with pytest.raises(TagSchemaError, match=r"Unknown tag level 'scop'.*valid levels: \['scope', 'type', 'preservation'\]"):
        schema.encode({"scop": ["local editing"]})
