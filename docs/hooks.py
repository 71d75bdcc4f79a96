"""mkdocs hooks: pages and pictures generated from the code at build time.

* ``<!-- yaml-reference -->`` in a page is replaced by :func:`kvpolicy.docgen.yaml_reference`.
* ``images/retention-<policy>.png`` is drawn for every registered policy by running its stores.
"""

from __future__ import annotations

import tempfile

from mkdocs.structure.files import File

from kvpolicy.docgen import write_retention_pictures, yaml_reference

_TMP = tempfile.TemporaryDirectory(prefix="kvpolicy-docs-")


def on_files(files, config):
    for path in write_retention_pictures(_TMP.name):
        files.append(File.generated(config, f"images/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    return markdown.replace("<!-- yaml-reference -->", yaml_reference())
