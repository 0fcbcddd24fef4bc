"""The typed namespace: its name is the store's directory name (unchanged, so stores stay compatible),
its description round-trips through the store's record, and `diff` names the fields that differ."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from isocache import _core
from isocache._namespace import namespace_of
from isocache.namespace import Namespace

FIELDS = {"device": "cpu", "torch": "2.9", "grad_mode": "disabled"}


def _name_as_before(device_type: str, fields: dict[str, str]) -> str:
    """The name as `namespace_for_device` made it before namespaces had a type."""
    text = "\n".join(f"{k}={v}" for k, v in sorted(fields.items()))
    return f"{device_type}-{_core.blake3_hex(text.encode())[:16]}"


def test_the_name_is_the_digest_stores_already_use() -> None:
    namespace = Namespace(FIELDS)
    assert namespace.name == "cpu-59d8278471277398" == _name_as_before("cpu", FIELDS)
    assert str(namespace) == namespace.name and namespace.device_type == "cpu"
    assert Namespace(dict(reversed(FIELDS.items()))) == namespace, "the order of the fields does not matter"
    assert len({namespace, Namespace(dict(FIELDS))}) == 1


def test_namespace_of_a_device_names_it_as_before() -> None:
    device = torch.device("cpu")
    namespace = namespace_of(device, grad_mode="disabled")
    assert namespace.name == _name_as_before("cpu", dict(namespace.fields))
    assert namespace.device_type == "cpu"
    assert namespace.fields["grad_mode"] == "disabled" and namespace.fields["torch"] == torch.__version__
    assert namespace_of(device, grad_mode="enabled") != namespace


def test_the_description_round_trips() -> None:
    namespace = Namespace(FIELDS)
    text = namespace.describe({"max_autotune": "True", "debug": "False"})
    recorded = json.loads(text)
    assert recorded == {**FIELDS, "inductor_config_changed": "max_autotune=True, debug=False"}
    read = Namespace.from_description(text)
    assert read is not None and read == namespace and read.name == namespace.name
    assert read.inductor_changed == "max_autotune=True, debug=False"
    assert read.recorded() == recorded and list(read.recorded()) == sorted(recorded)
    assert read.describe({"max_autotune": "True", "debug": "False"}) == text
    assert Namespace.from_description("not json") is None and Namespace.from_description("[1, 2]") is None


def test_diff_names_the_fields_that_differ() -> None:
    on = Namespace({**FIELDS, "grad_mode": "enabled"})
    off = Namespace(FIELDS)
    assert on.diff(off) == {"grad_mode": ("enabled", "disabled")}
    assert on.diff(on) == {}
    fewer = Namespace.from_description('{"device": "cpu", "extra": "1", "inductor_config_changed": "x=1"}')
    assert fewer is not None
    assert fewer.diff(off) == {
        "extra": ("1", None),
        "grad_mode": (None, "disabled"),
        "inductor_config_changed": ("x=1", None),
        "torch": (None, "2.9"),
    }


def test_the_namespace_type_does_not_import_torch() -> None:
    code = "import sys, isocache.namespace; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
