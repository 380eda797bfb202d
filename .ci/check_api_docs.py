"""Every public name of keras_adamp (its __all__) has an entry in the built API
reference: `python .ci/check_api_docs.py SITE_DIR` after `mkdocs build`.

Reads __all__ from the source (no import, as mkdocstrings does)."""

import ast
import pathlib
import sys

site = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "site")
init = pathlib.Path(__file__).resolve().parents[1] / "keras_adamp" / "__init__.py"
names = None
for node in ast.parse(init.read_text()).body:
    if isinstance(node, ast.Assign) and any(
        getattr(t, "id", None) == "__all__" for t in node.targets
    ):
        names = ast.literal_eval(node.value)
if not names:
    sys.exit(f"no __all__ in {init}")
page = (site / "api" / "index.html").read_text()
missing = [name for name in names if f'id="keras_adamp.{name}"' not in page]
if missing:
    sys.exit(
        f"docs/api.md has no entry for keras_adamp.{', keras_adamp.'.join(missing)}"
    )
print(f"API reference: all {len(names)} public names of keras_adamp have an entry")
