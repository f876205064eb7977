"""Reading a study file: YAML as data only, with the quirks that silently change a study refused.

PyYAML's SafeLoader never constructs Python objects, but it keeps the last of two equal keys
without a word (`samples: 32` ... `samples: 512` runs 512). This loader refuses a key given twice
in one mapping, naming the key, both lines and the file. Standard anchors, aliases and merge keys
(`<<: *defaults`) keep working: a key that overrides a merged one is not a duplicate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from quantstudy.errors import QuantStudyError

_MERGE = "tag:yaml.org,2002:merge"


class _NoDuplicatesLoader(yaml.SafeLoader):
    origin = "<study file>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:  # explicit keys only: checked before merge keys are flattened in
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so below
                continue
            if first is None:
                seen[key] = key_node.start_mark.line + 1
            else:
                raise QuantStudyError(
                    f"{self.origin} line {key_node.start_mark.line + 1}: key `{key}` is given twice in the same "
                    f"mapping (first at line {first})", value=key,
                    fix=f"keep one `{key}:` entry; YAML would silently use the last one")
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The parsed study file; every way it can fail is one QuantStudyError naming the file."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise QuantStudyError(f"{path} is not UTF-8 text: byte {raw[e.start:e.start + 1]!r} at line {line}",
                              fix="save the study file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    if not text.strip() or all(ln.lstrip().startswith("#") or not ln.strip() for ln in text.splitlines()):
        raise QuantStudyError(f"{path} is empty", fix="a study file needs at least `name:` and `model:` "
                              "(see the README's study-file section)")
    loader = _NoDuplicatesLoader(text)
    loader.origin = loader.name = str(path)  # name: YAML's own error marks say the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        hint = " (YAML does not allow tabs for indentation: use spaces)" if "\t" in str(e) or "'\\t'" in str(e) else ""
        raise QuantStudyError(f"{path} is not valid YAML{hint}: {e}", fix="fix the YAML syntax at the line shown") from None
    finally:
        loader.dispose()
