"""The README's Python examples, as a user copies them: in order, in one namespace (each block
uses the names the ones before it defined)."""

import ast
import math
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_examples_parse_and_their_imports_resolve():
    """Every block is valid Python and every name it imports exists (a renamed or moved API
    breaks this before the slow run below)."""
    blocks = _python_blocks()
    assert len(blocks) >= 3
    for index, block in enumerate(blocks):
        tree = ast.parse(block, filename=f"README.md python block {index}")
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        exec(compile(ast.Module(body=imports, type_ignores=[]), "README imports", "exec"), {})


@pytest.mark.slow
def test_readme_examples_run_in_order():
    """The blocks run top to bottom (about 80 s: SVI for ten epochs, ArviZ's LOO on 50,000
    rows) and leave what they promise: a finite loss, posterior-predictive draws of shape
    ``(100, 5, 1)``, an InferenceData with a posterior predictive and a log-likelihood."""
    namespace = {}
    for index, block in enumerate(_python_blocks()):
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    assert math.isfinite(namespace["loss"])
    assert tuple(namespace["draws"].shape) == (100, 5, 1)
    idata = namespace["idata"]
    assert {"posterior", "posterior_predictive", "log_likelihood"} <= set(idata.groups())
