"""The README's Python blocks run as written (pasted into a fresh interpreter, in an empty folder)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_blocks_run_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no Python block"
    for n, block in enumerate(blocks):
        script = tmp_path / f"block{n}.py"
        script.write_text(block)
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              check=False)
        assert proc.returncode == 0, f"README block {n} failed:\n{proc.stderr[-3000:]}"
        assert "DeprecationWarning" not in proc.stderr


def test_the_quick_start_lowers_its_loss():
    """The quick start's printed losses fall (it optimizes something, on the embedded model)."""
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)[0]
    namespace = {}
    exec(compile(block, "README quick start", "exec"), namespace)  # noqa: S102 (the README's own code)
    losses = namespace["result"].losses
    assert losses[-1] < losses[0]


def test_old_module_names_still_import_with_a_warning():
    """The module names before the packages (sdo.strategies, sdo.tasks, ...) for one release."""
    import importlib
    import warnings

    import sdo._moved

    for old, homes in sdo._moved.MOVED.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sys.modules.pop(old, None)
            module = importlib.import_module(old)
        assert any(issubclass(w.category, DeprecationWarning) and homes[0] in str(w.message) for w in caught), old
        for name in getattr(importlib.import_module(homes[0]), "__all__", ()):
            assert getattr(module, name) is getattr(importlib.import_module(homes[0]), name)
    from sdo.tasks import edit, load_pipeline  # names of two homes

    assert load_pipeline is sdo.backbones.load_pipeline and edit is sdo.recipes.latent_tasks.edit
