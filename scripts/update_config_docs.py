#!/usr/bin/env python3
"""Regenerate the key tables of docs/configuration.md from the schema in run_config.py.

    python scripts/update_config_docs.py      (tests/test_run_config.py fails while they are stale)
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_moe_spec.run_config import reference_markdown  # noqa: E402

path = os.path.join(ROOT, "docs", "configuration.md")
with open(path) as f:
    doc = f.read()
begin = "<!-- BEGIN GENERATED: megatron_moe_spec.run_config.reference_markdown() -->\n"
end = "<!-- END GENERATED -->\n"
new, n = re.subn(re.escape(begin) + ".*?" + re.escape(end), lambda _: begin + reference_markdown() + end, doc,
                 flags=re.S)
if n != 1:
    sys.exit(f"{path}: the GENERATED markers are missing")
with open(path, "w") as f:
    f.write(new)
print(f"updated {path}")
