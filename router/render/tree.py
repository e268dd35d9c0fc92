"""Writing the rendered files into the output folder, and reading back the previous ones."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from router.render.files import DIR_MODE, RUN_DIR, UNIT_FILE, Files
from router.render.mode import MODE_FILE


def write_tree(out: Path, files: Files) -> None:
    """Write `files` under `out` so a failure leaves the previous output intact.

    Everything is first written into a staging folder inside `out` (same file
    system), then renamed into place: the engines folder as a whole, then the
    scripts, and supervisord.conf last, so it never names a script that is
    not there. Run-time files (logs/, run/, socket, pidfile) are left alone,
    so a running supervisord keeps working and picks the change up with
    ``supervisorctl update`` or ``render --apply``.
    """
    out.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(out, DIR_MODE)
    for runtime in ("logs", RUN_DIR):
        (out / runtime).mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(out / runtime, DIR_MODE)
    stage = Path(tempfile.mkdtemp(prefix=".render-", dir=out))
    try:
        (stage / "engines").mkdir(mode=DIR_MODE)
        for rel, (text, mode) in files.items():
            _write_file(stage / rel, text, mode)
        old = stage / "engines.old"
        if (out / "engines").exists():
            os.rename(out / "engines", old)
        try:
            os.rename(stage / "engines", out / "engines")
        except OSError:
            if old.exists():
                os.rename(old, out / "engines")
            raise
        for rel in sorted(files, key=lambda r: r == "supervisord.conf"):
            if not rel.startswith("engines/"):
                os.replace(stage / rel, out / rel)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_file(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)  # the umask may have narrowed it; never widened past `mode`


def read_tree(out: Path) -> dict[str, str]:
    """The rendered files now in `out` (relative path -> text), before a new render
    replaces them: what ``--apply`` compares the new rendering with."""
    found = [out / "supervisord.conf", out / MODE_FILE, out / "tmux-launch.sh", out / "tmux-logs.sh", out / UNIT_FILE,
             *sorted((out / "engines").glob("*.sh"))]
    return {str(p.relative_to(out)): p.read_text(encoding="utf-8", errors="replace") for p in found if p.is_file()}
