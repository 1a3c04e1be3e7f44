"""The package facade and the command's start-up cost."""

from __future__ import annotations

import subprocess
import sys

import stargzfs


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from stargzfs.cli.main import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "mods = ('trio', 'httpx', 'zstandard', 'pyfuse3', 'sqlite3')\n"
        "print('heavy=' + ','.join(m for m in mods if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "heavy="


def test_facade_exports_resolve() -> None:
    for name in stargzfs.__all__:
        assert getattr(stargzfs, name) is not None, name


def test_exit_codes_are_distinct() -> None:
    classes = [
        stargzfs.UsageError,
        stargzfs.AuthError,
        stargzfs.NotFoundError,
        stargzfs.RegistryError,
        stargzfs.IntegrityError,
        stargzfs.UnsupportedError,
    ]
    assert sorted(c.exit_code for c in classes) == [2, 3, 4, 5, 6, 7]
    assert stargzfs.StargzfsError.exit_code == 1
