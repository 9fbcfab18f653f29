"""The package surface: every seed name importable from miniray.rl; layering of imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import miniray.rl

SRC = Path(miniray.rl.__file__).parent.parent

SEED_NAMES = [
    "FullyAsyncRollouter",
    "FullyAsyncTrainer",
    "TeacherClient",
    "UnifiedParameterSynchronizer",
    "ParameterSynchronizer",
    "AsyncParameterSynchronizer",
    "ParameterSyncManager",
    "MessageQueue",
    "MessageQueueClient",
]


def test_every_seed_name_is_importable_from_miniray_rl():
    for name in SEED_NAMES:
        assert hasattr(miniray.rl, name), name
        assert name in miniray.rl.__all__
    assert set(miniray.rl.__all__) <= set(dir(miniray.rl))


def test_names_that_need_torch_import_on_first_use_as_their_modules_classes():
    code = (
        "import sys, miniray.rl\n"
        "assert 'torch' not in sys.modules\n"
        "from miniray.rl import FullyAsyncRollouter, FullyAsyncTrainer, TeacherClient\n"
        "from miniray.rl.rollouter import FullyAsyncRollouter as R\n"
        "from miniray.rl.trainer import FullyAsyncTrainer as T\n"
        "from miniray.rl.distill.teacher_client import TeacherClient as C\n"
        "assert (FullyAsyncRollouter, FullyAsyncTrainer, TeacherClient) == (R, T, C)\n"
        "try:\n"
        "    miniray.rl.NoSuchName\n"
        "except AttributeError as e:\n"
        "    assert 'NoSuchName' in str(e)\n"
        "else:\n"
        "    raise SystemExit('a missing name did not raise AttributeError')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n == "miniray" or n.startswith("miniray.")}


def test_layering_config_imports_nothing_and_rl_no_ps_or_train():
    assert _project_imports(SRC / "config.py") == set()
    for path in (SRC / "rl").rglob("*.py"):
        for name in _project_imports(path):
            assert not name.startswith(("miniray.ps", "miniray.train", "miniray.cli")), (
                f"{path.name} imports {name}: rl sits beside ps/train, not above them"
            )


def test_importing_miniray_rl_does_not_import_torch():
    # The queue and the synchronizer must work in processes that never load torch.
    code = "import sys, miniray.rl; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
