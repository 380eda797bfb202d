"""Griffe extension for the API reference (mkdocs.yml): fills the
``{{base_optimizer_keyword_args}}`` placeholder that the optimizers' modules
substitute at import time (mkdocstrings reads the source without importing
it), and turns the reST roles of the docstrings (``:func:`x```) into
Markdown code spans."""

import ast
import re

import griffe

PLACEHOLDER = "{{base_optimizer_keyword_args}}"
ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj):`~?([^`]+)`")


class KerasDocstrings(griffe.Extension):
    def on_package(self, *, pkg, **kwargs):
        shared = pkg["_docs"]["base_optimizer_keyword_args"]
        text = ast.literal_eval(str(shared.value))
        # The shared text is indented for a class docstring's raw source (its
        # entries at 8 spaces); griffe's docstrings are dedented by 4.
        lines = text.splitlines()
        args = "\n".join([lines[0], *(line[4:] for line in lines[1:])])
        for obj in _walk(pkg):
            if obj.docstring is None:
                continue
            value = obj.docstring.value.replace(PLACEHOLDER, args)
            obj.docstring.value = ROLE.sub(r"`\1`", value)


def _walk(obj):
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)
