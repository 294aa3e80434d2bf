"""docs/configuration.md is generated from the package's default config (scripts/config_reference.py): the
committed page must be what the script writes now, so a key added to default.yaml reaches the docs site."""

from __future__ import annotations

import importlib.util
import sys

from conftest import ROOT

from lakelens import config


def _script():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_committed_configuration_page_is_the_generated_one():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == _script().render(), "docs/configuration.md is stale: run .venv/bin/python scripts/config_reference.py"


def test_the_page_names_every_key_the_config_accepts():
    page = (ROOT / "docs" / "configuration.md").read_text()
    conf = config.load(None)
    for section, values in vars(conf).items():
        for key in vars(values):
            assert f"`{section}.{key}`" in page, f"{section}.{key} is missing from docs/configuration.md"


def test_a_key_added_to_the_defaults_changes_the_page():
    script = _script()
    text = script.SOURCE.read_text().replace("  lock_wait: 0\n  commit_retries: 5\n",
                                             "  lock_wait: 0\n  commit_retries: 5\n  # A new key.\n  new_key: 3\n", 1)
    page = script.render(text)
    assert "| `embed.new_key` | `3` | A new key. |" in page and page != script.render()
